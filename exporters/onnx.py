"""ONNX export (torch.onnx) and ONNX Runtime sessions.

Exporter choice: the dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18). With torch 2.13 and
onnxruntime 1.31 its graph quantizes cleanly with ``quantize_dynamic`` (MiniLM: cosine 0.9925 to fp32,
the same as the TorchScript exporter's graph), and it is the exporter torch maintains; the TorchScript
one is deprecated. Older onnxruntime releases clashed with the shape annotations the dynamo exporter
writes (``graph.value_info``), so those are cleared before quantization: ORT re-infers them.

Quantization (see :func:`_quantize`):

- ``int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on MatMul/Gemm weights, QInt8, per output
  channel (per-tensor cost cosine 0.965 on MiniLM and QUInt8 ran ~50% slower), plus the Gather (embedding
  tables) when ``embedding_bits == 8``.
- ``int8_static``: ``quantize_static`` (QDQ, MinMax calibration) restricted to the Linear MatMul/Gemm nodes,
  minus the layer groups in ``QuantSpec.float_layers``. Nodes are mapped to PyTorch module paths through the
  dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata, so the choice is made by name, not by position.
- ``8da4w`` / ``int4_weight_only``: ``MatMulNBitsQuantizer`` (int4, symmetric, blocks of ``group_size``),
  ``accuracy_level`` 4 (int8 activations inside the kernel) or 0 (float activations).
- ``fp16``: ``onnxruntime.transformers.float16`` with int64 inputs and a float32 output kept.

LayerNorm, Softmax, GELU and residual adds stay float: static int8 over every op collapses transformer
accuracy (MiniLM cosine 0.38).

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

from exporters import register
from exporters.base import (
    Artifact,
    ArtifactLoadError,
    ExportFailedError,
    ExportOptions,
    ModuleFormat,
    QuantSpec,
    TensorSpec,
    adapter_path,
    check_artifact_file,
    ensure_scheme,
    in_modules,
    is_float_layer,
    output_shape,
    package_versions,
    require,
    require_calibration,
    require_installed,
)

FORMAT = "onnx"
SUFFIX = ".onnx"
SCHEMES = ("fp32", "fp16", "int8_dynamic", "int8_static", "8da4w", "int4_weight_only")
DELEGATE = "CPUExecutionProvider"
#: Profile backend names this exporter's artifacts are validated with.
DELEGATES = ("CPUExecutionProvider",)
OPSET = 18


def check_installed() -> None:
    """Raise RuntimeNotInstalledError unless the ONNX converter and runtime packages are installed."""
    require_installed(
        ("onnx", "onnx"),
        ("onnxscript", "onnxscript"),
        ("onnxruntime", "onnxruntime"),
        purpose="for ONNX export and validation",
    )


def runtime_versions() -> dict[str, str]:
    return package_versions("torch", "onnx", "onnxscript", "onnxruntime")


def export(
    module: Any,
    example_inputs: dict[str, Any],
    quant: QuantSpec,
    path: Path,
    options: ExportOptions | None = None,
) -> Artifact:
    """Export ``module`` (forward(input_ids, attention_mask) -> float32 [batch, ...]) to ``path``.

    Args:
        example_inputs: ``{"input_ids", "attention_mask"}`` int64 tensors [1, max_seq]; max_seq bounds the
            dynamic sequence axis.
        quant: any of :data:`SCHEMES` (see module docstring).
        path: the ``.onnx`` file to write (a single file; no external data).
        options: :class:`~exporters.base.ExportOptions`: the output name, ``calibration`` feeds for
            ``int8_static``, and ``adapter_modules``, whose weights are stored as ONNX external data in
            ``<stem>.adapter.data`` beside the model and never quantized; a file with the same layout from
            another adapter swaps in at load time (:func:`load`).
    Raises:
        UnsupportedQuantError: a scheme not in :data:`SCHEMES`.
        RuntimeNotInstalledError: torch.onnx's dependencies or onnxruntime missing.
        ExportFailedError: torch.onnx or the quantizer failed.
    """
    options = options or ExportOptions()
    output_name, calibration, adapter_modules = options.output_name, options.calibration, options.adapter_modules
    ensure_scheme(quant, SCHEMES, "ONNX")
    if quant.scheme == "int8_static":
        calibration = require_calibration(calibration, "ONNX")
    import torch

    require("onnxscript", "onnxscript", "to export ONNX with torch.onnx")
    require("onnx", "onnx", "to export ONNX")
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
        adapter_inits = _isolate_adapter(fp32_path, adapter_modules) if adapter_modules else []
        if quant.scheme == "fp32":
            os.replace(fp32_path, path)
        else:
            details.update(_quantize(fp32_path, path, quant, calibration, Path(tmp), adapter_modules))
    companions = []
    if adapter_modules:
        companions = [_externalize_adapter(path, adapter_inits)]
        details["adapter_file"] = companions[0].name
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        inputs=[
            TensorSpec("input_ids", "int64", ("batch", "seq")),
            TensorSpec("attention_mask", "int64", ("batch", "seq")),
        ],
        outputs=[TensorSpec(output_name, "float32", ("batch", *out_shape))],
        runtime=runtime_versions(),
        details={**details, "max_seq_len": max_seq},
        export_seconds=time.perf_counter() - start,
        companions=companions,
    )


def _node_scopes(node: Any) -> list[str]:
    """The PyTorch module paths a node was exported from (``pkg.torch.onnx.name_scopes`` metadata)."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:
        return [str(x) for x in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))]
    except (ValueError, SyntaxError):
        return []


def _adapter_nodes(model: Any, adapter_modules: tuple[str, ...]) -> list[Any]:
    """Nodes exported from a module whose path contains one of ``adapter_modules``."""
    return [n for n in model.graph.node if any(in_modules(s, adapter_modules) for s in _node_scopes(n))]


def _isolate_adapter(path: Path, adapter_modules: tuple[str, ...]) -> list[str]:
    """Find the initializers read by adapter nodes in the fp32 graph at ``path``, give each adapter node its
    own copy of an initializer it shares with base nodes (the exporter merges equal constants, and a base
    weight must not move into a swappable file), and save the graph. Returns the adapter initializer names.
    Raises ExportFailedError when the graph has no adapter weights."""
    onnx = require("onnx", "onnx", "to write ONNX external data")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    adapter = _adapter_nodes(model, adapter_modules)
    ids = {id(n) for n in adapter}
    base_reads = {x for n in model.graph.node if id(n) not in ids for x in n.input}
    names: set[str] = set()
    for node in adapter:
        for k, x in enumerate(node.input):
            if x not in inits:
                continue
            if x in base_reads:
                copy_name = f"{x}.adapter.{node.name}"
                t = model.graph.initializer.add()
                t.CopyFrom(inits[x])
                t.name = copy_name
                node.input[k] = x = copy_name
            names.add(x)
    if not names:
        raise ExportFailedError(
            f"no weights of modules matching {', '.join(adapter_modules)} in the graph: "
            "the model has no adapter to store separately"
        )
    onnx.save(model, str(path))
    return sorted(names)


def _externalize_adapter(path: Path, names: list[str]) -> Path:
    """Move the initializers ``names`` of the model at ``path`` into ``<stem>.adapter.data`` (ONNX external
    data: raw little-endian tensor bytes at recorded offsets, in name order, so two adapters of one base
    give files of the same layout). Rewrites ``path``; returns the data file."""
    onnx = require("onnx", "onnx", "to write ONNX external data")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ExportFailedError(f"adapter weights {missing[:3]} were rewritten by quantization; export fp32")
    data_path = adapter_path(path, ".data")
    offset = 0
    with open(data_path, "wb") as f:
        for name in names:
            t = inits[name]
            raw = onnx.numpy_helper.to_array(t).tobytes()
            f.write(raw)
            del t.external_data[:]
            t.ClearField("raw_data")
            for field_ in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field_)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += len(raw)
    onnx.save(model, str(path))
    return data_path


def _linear_nodes(model: Any) -> list[tuple[str, str]]:
    """``(node name, PyTorch module path)`` of every MatMul/Gemm whose weight is a constant (the Linear
    layers; attention's activation x activation MatMuls are left out). The module path comes from the
    dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in constants:
            continue
        scopes = _node_scopes(node)
        out.append((node.name, scopes[-2] if len(scopes) >= 2 else ""))
    return out


def _quantize(
    fp32_path: Path,
    path: Path,
    quant: QuantSpec,
    calibration: list[dict[str, Any]] | None,
    tmp: Path,
    adapter_modules: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Quantize the fp32 graph at ``fp32_path`` into ``path`` by ``quant.scheme``; returns report details.

    - fp16: ``onnxruntime.transformers.float16`` (inputs and outputs stay int64 / float32).
    - int8_dynamic: ``quantize_dynamic``, MatMul/Gemm (+ Gather) QInt8 per channel.
    - int8_static: ``quantize_static`` (QDQ, MinMax calibration on ``calibration``) on the Linear MatMul/Gemm
      nodes outside ``quant.float_layers``; then the Gather tables dynamically (8-bit).
    - 8da4w / int4_weight_only: ``MatMulNBitsQuantizer`` (symmetric int4, blocks of ``group_size``) with
      ``accuracy_level`` 4 (activations quantized to int8 in the kernel) or 0 (float activations).

    Nodes of ``adapter_modules`` stay float in every scheme (their weights are swapped at load time).
    """
    onnx = require("onnx", "onnx", "to quantize ONNX models")
    qz = require("onnxruntime.quantization", "onnxruntime", "to quantize ONNX models")
    model = onnx.load(str(fp32_path))
    del model.graph.value_info[:]  # let ORT re-infer shapes (see module docstring)
    details: dict[str, Any] = {"float_ops": ["LayerNormalization", "Softmax", "Gelu/Erf", "Add (residual)"]}
    gather = quant.embedding_bits == 8
    try:
        # a Gemm is rewritten to "<name>_MatMul" (+ Add) before quantization: exclude that name too
        adapter = (
            [x for n in _adapter_nodes(model, adapter_modules) for x in (n.name, f"{n.name}_MatMul")]
            if adapter_modules
            else []
        )
        if quant.scheme == "fp16":
            f16 = require("onnxruntime.transformers.float16", "onnxruntime", "for fp16 conversion")
            onnx.save(f16.convert_float_to_float16(model, keep_io_types=True), str(path))
            return {"weights": "float16", "float_ops": []}
        cleared = tmp / "cleared.onnx"
        onnx.save(model, str(cleared))
        if quant.scheme == "int8_dynamic":
            op_types = ["MatMul", "Gemm"] + (["Gather"] if gather else [])
            qz.quantize_dynamic(
                str(cleared),
                str(path),
                per_channel=quant.per_channel,
                weight_type=qz.QuantType.QInt8,
                op_types_to_quantize=op_types,
                nodes_to_exclude=adapter,
            )
            return {**details, "quantized_op_types": op_types}
        linear = _linear_nodes(model)
        kept = [(n, m) for n, m in linear if is_float_layer(m, quant.float_layers) or n in adapter]
        chosen = [n for n, m in linear if (n, m) not in kept]
        stage = tmp / "stage.onnx"
        if quant.scheme == "int8_static":
            feeds = [{k: np.asarray(v, dtype=np.int64) for k, v in row.items()} for row in calibration or []]

            class Reader(qz.CalibrationDataReader):
                def __init__(self):
                    self._it = iter(feeds)

                def get_next(self):
                    return next(self._it, None)

            qz.quantize_static(
                str(cleared),
                str(stage),
                Reader(),
                quant_format=qz.QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=chosen,
                per_channel=quant.per_channel,
                activation_type=qz.QuantType.QUInt8,
                weight_type=qz.QuantType.QInt8,
                calibrate_method=qz.CalibrationMethod.MinMax,
            )
            details.update(activations=f"uint8 static (MinMax over {len(feeds)} calibration inputs)")
        else:
            nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime", "for int4")
            level = 4 if quant.scheme == "8da4w" else 0
            q = nbits.MatMulNBitsQuantizer(
                model,
                block_size=quant.group_size,
                is_symmetric=True,
                accuracy_level=level,
                nodes_to_exclude=[n for n, _ in kept],
            )
            q.process()
            q.model.save_model_to_file(str(stage), use_external_data_format=False)
            details.update(
                weights=f"int4 symmetric, blocks of {quant.group_size} (MatMulNBits)",
                activations="int8 in the kernel (accuracy_level 4)" if level else "float",
            )
        if gather:
            qz.quantize_dynamic(str(stage), str(path), weight_type=qz.QuantType.QInt8, op_types_to_quantize=["Gather"])
        else:
            os.replace(stage, path)
    except Exception as exc:
        raise ExportFailedError(
            f"onnxruntime quantization ({quant.scheme}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    details["quantized_linear_nodes"] = len(chosen)
    details["float_linear_layers"] = sorted({m for _, m in kept})
    return details


class OnnxSession:
    """An ONNX Runtime CPU session. ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 array}``.

    ``adapter``: another ``.adapter.data`` file to use instead of the one beside the model (same layout: an
    adapter of the same base exported by edgelm); ONNX Runtime reads it through
    ``SessionOptions.add_external_initializers_from_files_in_memory``.
    """

    def __init__(self, path: Path, threads: int | None = None, adapter: Path | None = None):
        ort = require("onnxruntime", "onnxruntime", "to run .onnx artifacts")
        path = check_artifact_file(path, SUFFIX, "ONNX")
        if hasattr(ort, "disable_telemetry_events"):  # no telemetry event queue (edgelm also sets the env)
            ort.disable_telemetry_events()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if adapter is not None:
            adapter = Path(adapter)
            if not adapter.is_file():
                raise ArtifactLoadError(f"adapter weights not found: {adapter}")
            buf = np.fromfile(adapter, dtype=np.uint8)
            opts.add_external_initializers_from_files_in_memory([adapter_path(path, ".data").name], [buf], [buf.size])
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=[DELEGATE])
        except Exception as exc:
            raise ArtifactLoadError(
                f"ONNX Runtime could not load {path}"
                + (f" with adapter {adapter.name}" if adapter else "")
                + f": {exc}"
            ) from exc
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: np.ascontiguousarray(feeds[k], dtype=np.int64) for k in self.input_names}
        outs = self._sess.run(self.output_names, arrays)
        return dict(zip(self.output_names, outs, strict=False))


def load(path: Path, threads: int | None = None, adapter: Path | None = None) -> OnnxSession:
    """Open an ``.onnx`` artifact (with ``adapter``: another adapter's weights file, see :class:`OnnxSession`).
    Raises ArtifactLoadError (missing/corrupt) or RuntimeNotInstalledError."""
    return OnnxSession(path, threads, adapter)


@register
class ONNXFormat(ModuleFormat):
    """ONNX (``.onnx``) through ``torch.onnx`` (dynamo) and ONNX Runtime's quantizers; runs in ONNX Runtime."""

    name = FORMAT
    suffix = SUFFIX
    schemes = SCHEMES
    unsupported = {}
    delegates = DELEGATES
    profile_runtimes = "onnx_execution_providers"
    runtime_overhead_mb = 25.0
    app_runtime = "onnxruntime"
