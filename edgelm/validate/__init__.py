"""Validation: metrics (numpy), the torch-free target script, and runners that execute it.

Nothing in this package imports torch at module level: ``edgelm.validate.target`` runs on boards and in
the emulator with only numpy and a runtime installed.
"""
