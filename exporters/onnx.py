"""ONNX export (torch.onnx) and ONNX Runtime sessions.

Exporter choice: the dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18). With torch 2.13 and
onnxruntime 1.31 its graph quantizes cleanly with ``quantize_dynamic`` (MiniLM: cosine 0.9925 to fp32,
the same as the TorchScript exporter's graph), and it is the exporter torch maintains; the TorchScript
one is deprecated. Older onnxruntime releases clashed with the shape annotations the dynamo exporter
writes (``graph.value_info``), so those are cleared before quantization: ORT re-infers them.

Quantization (``int8_dynamic``): ``onnxruntime.quantization.quantize_dynamic`` on MatMul/Gemm weights,
QInt8, per output channel (per-tensor cost cosine 0.965 on MiniLM and QUInt8 ran ~50% slower), plus the
Gather (embedding tables) when ``embedding_bits == 8``. LayerNorm, Softmax, GELU and residual adds stay
float: static int8 over every op collapses transformer accuracy (MiniLM cosine 0.38).

Signature: ``input_ids`` and ``attention_mask`` int64 [batch, seq] with both dims dynamic (seq from 2 to
the example's length), one float32 output [batch, ...].
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (
    Artifact,
    ArtifactLoadError,
    ExportFailedError,
    QuantSpec,
    TensorSpec,
    check_artifact_file,
    ensure_scheme,
    output_shape,
    package_versions,
    require,
    require_installed,
)

FORMAT = "onnx"
SUFFIX = ".onnx"
SCHEMES = ("fp32", "int8_dynamic")
DELEGATE = "CPUExecutionProvider"
#: Profile backend names this exporter's artifacts are validated with.
DELEGATES = ("CPUExecutionProvider",)
OPSET = 18


def check_installed() -> None:
    """Raise RuntimeNotInstalledError unless the ONNX converter and runtime packages are installed."""
    require_installed(("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"),
                      purpose="for ONNX export and validation")


def runtime_versions() -> dict[str, str]:
    return package_versions("torch", "onnx", "onnxscript", "onnxruntime")


def export(
    module: Any,
    example_inputs: dict[str, Any],
    quant: QuantSpec,
    path: Path,
    *,
    output_name: str = "output",
    **_: Any,
) -> Artifact:
    """Export ``module`` (forward(input_ids, attention_mask) -> float32 [batch, ...]) to ``path``.

    Args:
        example_inputs: ``{"input_ids", "attention_mask"}`` int64 tensors [1, max_seq]; max_seq bounds the
            dynamic sequence axis.
        quant: ``fp32`` or ``int8_dynamic`` (see module docstring).
        path: the ``.onnx`` file to write (a single file; no external data).
    Raises:
        UnsupportedQuantError: a scheme not in :data:`SCHEMES`.
        RuntimeNotInstalledError: torch.onnx's dependencies or onnxruntime missing.
        ExportFailedError: torch.onnx or the quantizer failed.
    """
    ensure_scheme(quant, SCHEMES, "ONNX")
    import torch

    require("onnxscript", "onnxscript", "to export ONNX with torch.onnx")
    onnx = require("onnx", "onnx", "to export ONNX")
    path = Path(path)
    start = time.perf_counter()
    ids, mask = example_inputs["input_ids"], example_inputs["attention_mask"]
    max_seq = int(ids.shape[1])
    out_shape = output_shape(module, example_inputs)
    # Trace at batch 2 so that torch.export does not specialise the batch axis to its example value 1.
    args = (ids.repeat(2, 1), mask.repeat(2, 1))
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(fp32_path),
                dynamo=True,
                opset_version=OPSET,
                input_names=["input_ids", "attention_mask"],
                output_names=[output_name],
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # torch.onnx raises many types; the message is what matters
            raise ExportFailedError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        details: dict[str, Any] = {"opset": OPSET, "exporter": "torch.onnx dynamo", "delegate": DELEGATE}
        if quant.scheme == "int8_dynamic":
            qz = require("onnxruntime.quantization", "onnxruntime", "to quantize ONNX models")
            op_types = ["MatMul", "Gemm"] + (["Gather"] if quant.embedding_bits == 8 else [])
            model = onnx.load(str(fp32_path))
            del model.graph.value_info[:]  # let ORT re-infer shapes (see module docstring)
            cleared = Path(tmp) / "cleared.onnx"
            onnx.save(model, str(cleared))
            try:
                qz.quantize_dynamic(
                    str(cleared),
                    str(path),
                    per_channel=quant.per_channel,
                    weight_type=qz.QuantType.QInt8,
                    op_types_to_quantize=op_types,
                )
            except Exception as exc:
                raise ExportFailedError(f"onnxruntime quantize_dynamic failed: {exc}") from exc
            details["quantized_op_types"] = op_types
            details["float_ops"] = ["LayerNormalization", "Softmax", "Gelu/Erf", "Add (residual)"]
        else:
            os.replace(fp32_path, path)
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        inputs=[TensorSpec("input_ids", "int64", ("batch", "seq")),
                TensorSpec("attention_mask", "int64", ("batch", "seq"))],
        outputs=[TensorSpec(output_name, "float32", ("batch", *out_shape))],
        runtime=runtime_versions(),
        details={**details, "max_seq_len": max_seq},
        export_seconds=time.perf_counter() - start,
    )


class OnnxSession:
    """An ONNX Runtime CPU session. ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 array}``."""

    def __init__(self, path: Path, threads: int | None = None):
        ort = require("onnxruntime", "onnxruntime", "to run .onnx artifacts")
        path = check_artifact_file(path, SUFFIX, "ONNX")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=[DELEGATE])
        except Exception as exc:
            raise ArtifactLoadError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(feeds[k], dtype=np.int64) for k in self.input_names}
        outs = self._sess.run(self.output_names, arrays)
        return dict(zip(self.output_names, outs))


def load(path: Path, threads: int | None = None) -> OnnxSession:
    """Open an ``.onnx`` artifact. Raises ArtifactLoadError (missing/corrupt) or RuntimeNotInstalledError."""
    return OnnxSession(path, threads)
