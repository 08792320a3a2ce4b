"""ExecuTorch export (torch.export -> PT2E quantization -> XNNPACK delegate -> .pte) and sessions.

Quantization (``int8_dynamic``): the XNNPACK PT2E quantizer with its symmetric, per-channel, dynamic
config (int8 weights per output channel, activations quantized on the fly), which XNNPACK runs as
dynamically-quantized fully-connected kernels. Only Linear layers are annotated by that config, so
LayerNorm, Softmax and GELU stay float (XNNPACK leaves LayerNorm outside the delegate). With
``embedding_bits == 8`` every ``nn.Embedding`` table is stored int8 with one fp32 scale per row and read
through ``quantized_decomposed.embedding_byte`` (ExecuTorch's quantized kernel library has its out
variant; torchao's ``dequantize_affine`` has none at ``to_executorch``). On MiniLM that takes the .pte
from 58.6 MB to 23.6 MB at cosine 0.998.

Signature: ``input_ids`` and ``attention_mask`` int64 [1, seq], seq dynamic from 2 to the example's length
(``torch.export.Dim``); batch is 1 (the session loops over rows). Output float32 [1, ...].
"""

from __future__ import annotations

import copy
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
    split_rows,
)

FORMAT = "executorch"
SUFFIX = ".pte"
SCHEMES = ("fp32", "int8_dynamic")
DELEGATE = "XnnpackPartitioner"
#: Profile backend names this exporter can lower to.
DELEGATES = ("xnnpack",)


def check_installed() -> None:
    """Raise RuntimeNotInstalledError unless executorch and torchao are installed."""
    require_installed(("executorch", "executorch"), ("torchao", "torchao"),
                      purpose="for ExecuTorch export and validation")


def runtime_versions() -> dict[str, str]:
    return package_versions("torch", "executorch", "torchao")


def _quantize_embeddings(module: Any) -> int:
    """Replace every ``nn.Embedding`` in ``module`` (in place) by an int8 per-row table. Returns the count."""
    import torch

    require("executorch.exir.passes._quant_patterns_and_replacements", "executorch",
            "for the 8-bit embedding op")  # registers torch.ops.quantized_decomposed.embedding_byte

    class ByteEmbedding(torch.nn.Module):
        """int8 [num_embeddings, dim] table, fp32 [num_embeddings] scales (symmetric, per row)."""

        def __init__(self, emb: torch.nn.Embedding):
            super().__init__()
            w = emb.weight.detach().to(torch.float32)
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
            self.register_buffer("weight", torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
            self.register_buffer("scales", scale)

        def forward(self, indices: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized_decomposed.embedding_byte.default(
                self.weight, self.scales, None, -128, 127, indices
            )

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Embedding):
                setattr(parent, name, ByteEmbedding(child))
                count += 1
    return count


def export(
    module: Any,
    example_inputs: dict[str, Any],
    quant: QuantSpec,
    path: Path,
    *,
    output_name: str = "output",
    **_: Any,
) -> Artifact:
    """Export ``module`` (forward(input_ids, attention_mask) -> float32 [1, ...]) to a ``.pte`` file.

    Args:
        example_inputs: ``{"input_ids", "attention_mask"}`` int64 tensors [1, max_seq]; the sequence axis is
            exported dynamic in [2, max_seq].
        quant: ``fp32`` or ``int8_dynamic`` (see module docstring). The caller's module is not modified.
        path: the ``.pte`` file to write.
    Raises:
        UnsupportedQuantError, RuntimeNotInstalledError, ExportFailedError.
    """
    ensure_scheme(quant, SCHEMES, "ExecuTorch")
    import torch

    exir = require("executorch.exir", "executorch", "to export .pte programs")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch",
                  "for the XNNPACK delegate")
    path = Path(path)
    start = time.perf_counter()
    args = (example_inputs["input_ids"], example_inputs["attention_mask"])
    max_seq = int(args[0].shape[1])
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    dynamic_shapes = ({1: seq}, {1: seq})
    out_shape = output_shape(module, example_inputs)
    module = copy.deepcopy(module).eval()
    details: dict[str, Any] = {"delegate": DELEGATE, "max_seq_len": max_seq}
    try:
        with torch.no_grad():
            if quant.scheme == "int8_dynamic":
                if quant.embedding_bits == 8:
                    details["embedding_tables_int8"] = _quantize_embeddings(module)
                xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch",
                             "for the XNNPACK quantizer")
                pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "torchao", "for PT2E quantization")
                graph = torch.export.export(module, args, dynamic_shapes=dynamic_shapes).module()
                quantizer = xq.XNNPACKQuantizer().set_global(
                    xq.get_symmetric_quantization_config(is_per_channel=quant.per_channel, is_dynamic=True)
                )
                graph = pt2e.prepare_pt2e(graph, quantizer)
                graph(*args)  # dynamic quantization needs no calibration; one pass initialises observers
                module = pt2e.convert_pt2e(graph)
                details["quantized_ops"] = ["linear (int8 weights per channel, dynamic int8 activations)"]
                details["float_ops"] = ["layer_norm", "softmax", "gelu", "add (residual)"]
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
            edge = exir.to_edge_transform_and_lower(exported, partitioner=[xnn.XnnpackPartitioner()])
            program = edge.to_executorch()
    except Exception as exc:
        raise ExportFailedError(f"ExecuTorch export failed: {type(exc).__name__}: {exc}") from exc
    path.write_bytes(program.buffer)
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        inputs=[TensorSpec("input_ids", "int64", (1, "seq")), TensorSpec("attention_mask", "int64", (1, "seq"))],
        outputs=[TensorSpec(output_name, "float32", (1, *out_shape))],
        runtime=runtime_versions(),
        details=details,
        export_seconds=time.perf_counter() - start,
    )


class ExecuTorchSession:
    """A ``.pte`` program loaded in ExecuTorch's Python runtime (portable + quantized kernels, XNNPACK).

    ``threads`` sets XNNPACK's thread pool *before* the program is loaded (re-setting it after loading a
    method invalidates the method). ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 [batch, ...]}``;
    rows run one at a time (the program is exported at batch 1).
    """

    def __init__(self, path: Path, threads: int | None = None, output_name: str = "output"):
        path = check_artifact_file(path, SUFFIX, "ExecuTorch")
        self._torch = require("torch", "torch", "by ExecuTorch's Python runtime")
        runtime = require("executorch.runtime", "executorch", "to run .pte artifacts")
        require("executorch.kernels.quantized", "executorch", "for the quantized kernels of .pte artifacts")
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        try:
            program = runtime.Runtime.get().load_program(path)
            self._method = program.load_method("forward")
        except Exception as exc:
            raise ArtifactLoadError(f"ExecuTorch could not load {path}: {exc}") from exc
        self.input_names = ["input_ids", "attention_mask"]
        self.output_names = [output_name]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        outs = []
        for row in split_rows(feeds):
            tensors = [torch.from_numpy(np.ascontiguousarray(row[k], dtype=np.int64)) for k in self.input_names]
            outs.append(self._method.execute(tensors)[0].numpy().copy())
        return {self.output_names[0]: np.concatenate(outs, axis=0)}


def load(path: Path, threads: int | None = None, output_name: str = "output") -> ExecuTorchSession:
    """Open a ``.pte`` artifact. Raises ArtifactLoadError or RuntimeNotInstalledError."""
    return ExecuTorchSession(path, threads, output_name)
