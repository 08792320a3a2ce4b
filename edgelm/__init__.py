"""edgelm: device-profile-driven compression, export (ExecuTorch, ONNX, TFLite/LiteRT) and validation of
fine-tuned language models for phones and boards.

Importing ``edgelm`` is light (no torch): the runtime side (``edgelm.validate.target``) runs on boards
with only numpy and a runtime installed.
"""

__version__ = "0.1.0"

import os as _os

#: Environment that turns ONNX Runtime's telemetry off. Set here, in every process that imports edgelm (the
#: CLI, the torch-free target script on boards), and passed to the processes the runners start.
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}
_os.environ.update(TELEMETRY_OFF)
