"""edgelm: device-profile-driven compression, export (ExecuTorch, ONNX, TFLite/LiteRT) and validation of
fine-tuned language models for phones and boards.

Importing ``edgelm`` is light (no torch): the runtime side (``edgelm.validate.target``) runs on boards
with only numpy and a runtime installed.
"""

import logging as _logging
import os as _os

__version__ = "0.1.0"

#: Environment that turns ONNX Runtime's telemetry off. Set here, in every process that imports edgelm (the
#: CLI, the torch-free target script on boards), and passed to the processes the runners start.
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}
_os.environ.update(TELEMETRY_OFF)

#: Third-party loggers that print on every start and say nothing a user can act on: torchao's "Failed to
#: load ... .so" for CUDA-only kernels, torch's ``_pytree`` deprecation lines for torchao's enums.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
for _name in QUIET_LOGGERS:
    _logging.getLogger(_name).setLevel(_logging.ERROR)
