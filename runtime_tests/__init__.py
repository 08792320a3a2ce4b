"""The on-target checks of an export bundle, as a pytest suite: ``pytest runtime_tests --bundle dist/pixel8
--runner emulator``. ``edgelm validate`` runs it. See :mod:`runtime_tests.conftest` for the options."""
