"""edgelm: device-profile-driven compression, export (ExecuTorch, ONNX, TFLite/LiteRT) and validation of
fine-tuned language models for phones and boards.

Importing ``edgelm`` is light (no torch): the runtime side (``edgelm.validate.target``) runs on boards
with only numpy and a runtime installed.
"""

__version__ = "0.1.0"
