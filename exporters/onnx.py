"""ONNX export (torch.onnx) and ONNX Runtime sessions.

Exporter choice: the dynamo exporter (``torch.onnx.export(dynamo=True)``, opset 18): the exporter torch
maintains (the TorchScript one is deprecated), and its nodes carry the PyTorch module paths
(``pkg.torch.onnx.name_scopes``) that the quantization passes choose layers by. Older onnxruntime releases clashed with the shape annotations the dynamo exporter
writes (``graph.value_info``), so those are cleared before quantization: ORT re-infers them.

Quantization (see :func:`_quantize`):

- ``int8_dynamic``: per-token dynamic int8 activations x per-channel int8 weights, written with standard ONNX
  ops (:func:`_per_token_int8`): each token's activation row gets its own scale at run time (ZeroQuant's
  token-wise quantization, Yao et al. 2022; what XNNPACK's and torchao's dynamic int8 do), then
  ``MatMulInteger`` with both operands uint8 (zero point 128; exact on every CPU, see :func:`_per_token_int8`:
  uint8 x int8 saturates on x86 without VNNI). ONNX Runtime's own ``quantize_dynamic`` scales
  each activation *tensor* with one number, padding and outlier tokens included: on MiniLM fine-tuned on
  SST-2 it agreed with fp32 on 97.2% of dev sentences (Optimum's int8 configurations 95.6%); per token, 99.7%
  at 1.17x the latency of ONNX Runtime's fused per-tensor kernels (each activation is quantized once for the
  layers that read it; 1 thread, seq 128, VNNI Xeon). Measured alternatives, kept out: ``MatMulNBits`` 8-bit
  with ``accuracy_level`` 4 (as accurate, but slower than fp32 on x86), the six most sensitive layers float
  (99.4%, 1.5x the size). See ``benchmarks/peers_onnx.py``.
- Scales (weights per channel, embedding rows) are stored float16 where every value is a normal float16
  (:func:`_half_scales`).
- Embedding tables (``embedding_bits == 8``, every scheme): int8 with one scale per row
  (:func:`_per_row_gather`), dequantized after the Gather. ``quantize_dynamic``'s Gather quantization uses
  one scale for the whole table and cost a point of top-1 agreement on SST-2.
- ``int8_static``: ``quantize_static`` (QDQ, uint8 activations and weights, MinMax calibration) restricted to
  the Linear MatMul/Gemm nodes,
  minus the layer groups in ``QuantSpec.float_layers``. Nodes are mapped to PyTorch module paths through the
  dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata, so the choice is made by name, not by position.
- ``8da4w`` / ``int4_weight_only``: ``MatMulNBitsQuantizer`` (int4, symmetric, blocks of ``group_size``),
  ``accuracy_level`` 4 (int8 activations inside the kernel) or 0 (float activations). On x86 hosts ONNX
  Runtime 1.32 runs these slower than fp32 at seq 128 (the kernels target LLM decoding and Arm).
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
    adapter_path,
    as_feed,
    check_artifact_file,
    ensure_scheme,
    in_modules,
    input_specs,
    is_float_layer,
    output_specs,
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
    calibration, adapter_modules = options.calibration, options.adapter_modules
    ensure_scheme(quant, SCHEMES, "ONNX")
    if quant.scheme == "int8_static":
        calibration = require_calibration(calibration, "ONNX")
    import torch

    require("onnxscript", "onnxscript", "to export ONNX with torch.onnx")
    require("onnx", "onnx", "to export ONNX")
    path = Path(path)
    start = time.perf_counter()
    names = list(example_inputs)
    max_seq = int(next(iter(example_inputs.values())).shape[1])
    outputs = output_specs(module, example_inputs, options, ("batch",))
    # Trace at batch 2 so that torch.export does not specialise the batch axis to its example value 1.
    args = tuple(v.repeat(2, *([1] * (v.dim() - 1))) for v in example_inputs.values())
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
                input_names=names,
                output_names=list(options.names),
                dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
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
        inputs=input_specs(example_inputs, "int64", ("batch", "seq")),
        outputs=outputs,
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


def _add_initializer(model: Any, name: str, array: np.ndarray) -> str:
    """Add ``array`` as an initializer named ``name`` (with a numeric suffix if the graph has that name)."""
    from onnx import numpy_helper

    taken = {i.name for i in model.graph.initializer} | {x for n in model.graph.node for x in (*n.input, *n.output)}
    unique, k = name, 1
    while unique in taken:
        unique, k = f"{name}.{k}", k + 1
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), unique))
    return unique


def _half_scales(scale: np.ndarray) -> np.ndarray:
    """``scale`` (float32, > 0) rounded to float16 where every value is a normal float16 (6.1e-5 to 65504):
    a 2^-11 relative error, far below int8's 1/254 step, at half the bytes (GGUF's Q8_0 stores its scales so).
    Returned as float16 when it fits, else unchanged float32."""
    half = scale.astype(np.float16)
    return half if np.all(np.isfinite(half)) and float(scale.min()) >= 6.2e-5 else scale.astype(np.float32)


def _scale_input(model: Any, name: str, scale: np.ndarray, nodes: list[Any]) -> str:
    """An initializer holding ``scale`` (float16 when :func:`_half_scales` allows), read as float32: returns
    the name of the float32 value, appending the Cast to ``nodes`` when one is needed."""
    from onnx import TensorProto, helper

    stored = _half_scales(scale)
    init = _add_initializer(model, name, stored)
    if stored.dtype == np.float32:
        return init
    nodes.append(helper.make_node("Cast", [init], [f"{init}_f32"], to=TensorProto.FLOAT, name=f"{init}_f32"))
    return f"{init}_f32"


def _per_token_int8(model: Any, nodes: set[str], per_channel: bool = True) -> int:
    """Rewrite the Linear nodes named in ``nodes`` (MatMul with a constant [K, N] weight, or Gemm with transA 0)
    of ``model`` (in place) into per-token dynamic int8: for activations x float32 [..., K],

        s = max(|x|, axis=-1) / 127            float32 [..., 1] (one scale per token, at run time)
        q = round(x / s) + 128                 uint8   [..., K]
        y = MatMulInteger(q, W_q + 128, zp_a=128, zp_b=128) * w_s * s   (+ bias)

    with W_q the symmetric int8 weight [K, N] in [-127, 127], stored as uint8 with zero point 128, and w_s
    [N] per output channel (or one per tensor), stored float16 where :func:`_half_scales` allows. Both
    operands uint8 (U8U8): ONNX Runtime's x86 kernel for uint8 x int8 without VNNI (AVX2, AVX-512 without
    VNNI) multiplies with ``vpmaddubsw``, which saturates pairs of products at 16 bits (255 x 127 x 2 >
    32767; int32 sums off by up to 7e4 on a 384-deep product, 0.34 in a classifier's logits); U8U8 is exact
    on every CPU (Arm's ``udot`` too), at 1.08x U8S8's time for MiniLM on an AVX2 host (1 thread, seq 128;
    ``benchmarks/peers_onnx.py``). Standard ONNX ops only (opset
    18), so any ONNX Runtime build runs it. Returns the number of nodes rewritten; nodes whose weight is not
    an initializer stay float."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    if not nodes:
        return 0
    eps = _add_initializer(model, "pt_eps", np.array(1e-8, np.float32))
    qmax = _add_initializer(model, "pt_127", np.array(127.0, np.float32))
    shift = _add_initializer(model, "pt_128", np.array(128.0, np.float32))
    zero = _add_initializer(model, "pt_zero_point", np.array(128, np.uint8))
    axes = _add_initializer(model, "pt_axes", np.array([-1], np.int64))
    out_nodes, done = [], 0
    quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 activation, per-token scale), made once
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = node.name in nodes and len(node.input) >= 2 and node.input[1] in inits
        ok = ok and (node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transA", 0)))
        ok = ok and (node.op_type == "MatMul" or len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
        if not ok:
            out_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        if w.ndim != 2:
            out_nodes.append(node)
            continue
        alpha = float(attrs.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        amax = np.abs(w).max(axis=0) if per_channel else np.full(w.shape[1], np.abs(w).max())
        w_scale = _half_scales(np.maximum(amax, 1e-12) / 127.0).astype(np.float32)  # the scale stored
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int16) + 128  # symmetric int8, stored uint8
        n, x = node.name, node.input[0]
        wq = _add_initializer(model, f"{n}.weight_uint8", w_q.astype(np.uint8))
        ws = _scale_input(model, f"{n}.weight_scale", w_scale * alpha, out_nodes)
        y = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        scaled = f"{n}_y" if has_bias else y
        if x not in quantized:  # query, key and value read one activation: quantize it once
            out_nodes += [
                helper.make_node("Abs", [x], [f"{n}_abs"], name=f"{n}_abs"),
                helper.make_node("ReduceMax", [f"{n}_abs", axes], [f"{n}_amax"], keepdims=1, name=f"{n}_amax"),
                helper.make_node("Max", [f"{n}_amax", eps], [f"{n}_amax_eps"], name=f"{n}_amax_eps"),
                helper.make_node("Div", [f"{n}_amax_eps", qmax], [f"{n}_scale"], name=f"{n}_scale"),
                helper.make_node("Div", [x, f"{n}_scale"], [f"{n}_xs"], name=f"{n}_xs"),
                helper.make_node("Round", [f"{n}_xs"], [f"{n}_xr"], name=f"{n}_xr"),
                helper.make_node("Add", [f"{n}_xr", shift], [f"{n}_xu"], name=f"{n}_xu"),
                helper.make_node("Cast", [f"{n}_xu"], [f"{n}_xq"], to=TensorProto.UINT8, name=f"{n}_xq"),
            ]
            quantized[x] = (f"{n}_xq", f"{n}_scale")
        xq, scale = quantized[x]
        out_nodes += [
            helper.make_node("MatMulInteger", [xq, wq, zero, zero], [f"{n}_acc"], name=f"{n}_matmul"),
            helper.make_node("Cast", [f"{n}_acc"], [f"{n}_accf"], to=TensorProto.FLOAT, name=f"{n}_accf"),
            # weight scale first: ONNX Runtime fuses MatMulInteger-Cast-Mul into MatMulIntegerToFloat, which is
            # correct for a per-column scale and gave wrong results for a per-token one (onnxruntime 1.32)
            helper.make_node("Mul", [f"{n}_accf", ws], [f"{n}_yw"], name=f"{n}_yw"),
            helper.make_node("Mul", [f"{n}_yw", scale], [scaled], name=f"{n}_dequant"),
        ]
        if has_bias:
            bias = numpy_helper.to_array(inits[node.input[2]]) * float(attrs.get("beta", 1.0))
            b = _add_initializer(model, f"{n}.bias_scaled", bias.astype(np.float32))
            out_nodes.append(helper.make_node("Add", [scaled, b], [y], name=f"{n}_bias"))
        done += 1
    del graph.node[:]
    graph.node.extend(out_nodes)
    _drop_unused_initializers(model)
    return done


def _per_row_gather(model: Any, exclude: set[str] | frozenset[str] = frozenset()) -> int:
    """Store every embedding table of ``model`` (a Gather on axis 0 of a 2-D float32 initializer [V, H]) as
    int8 [V, H] with one scale per row [V] (symmetric; float16 where :func:`_half_scales` allows, cast back
    after the lookup), dequantized after the Gather: ``Gather(q, ids) -> Cast -> Mul(Gather(scale, ids))``.
    A table read by several Gathers is stored once; tables named in ``exclude`` (adapter weights) stay
    float. In place; returns the number of tables."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    out_nodes: list[Any] = []
    stored: dict[str, tuple[str, str]] = {}  # table name -> (int8 table, row scales)
    axes = None
    for node in graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        name = node.input[0] if node.op_type == "Gather" and axis == 0 and node.input else None
        if name not in stored:
            w = numpy_helper.to_array(inits[name]) if name in inits and name not in exclude else None
            if w is None or w.ndim != 2 or w.dtype != np.float32:
                out_nodes.append(node)
                continue
            scale = _half_scales(np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0)
            q_table = np.clip(np.round(w / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
            stored[name] = (
                _add_initializer(model, f"{name}.int8", q_table),
                _add_initializer(model, f"{name}.row_scale", scale),
            )
        axes = axes or _add_initializer(model, "row_axes", np.array([-1], np.int64))
        q, s = stored[name]
        n, ids = node.name, node.input[1]
        out_nodes += [
            helper.make_node("Gather", [q, ids], [f"{n}_q"], name=f"{n}_q"),
            helper.make_node("Cast", [f"{n}_q"], [f"{n}_qf"], to=TensorProto.FLOAT, name=f"{n}_qf"),
            helper.make_node("Gather", [s, ids], [f"{n}_s16"], name=f"{n}_s16"),
            helper.make_node("Cast", [f"{n}_s16"], [f"{n}_s"], to=TensorProto.FLOAT, name=f"{n}_s"),
            helper.make_node("Unsqueeze", [f"{n}_s", axes], [f"{n}_su"], name=f"{n}_su"),
            helper.make_node("Mul", [f"{n}_qf", f"{n}_su"], [node.output[0]], name=f"{n}_dequant"),
        ]
    del graph.node[:]
    graph.node.extend(out_nodes)
    _drop_unused_initializers(model)
    return len(stored)


def _used_names(graph: Any) -> set[str]:
    """Every value name read in ``graph`` and its subgraphs (If/Loop/Scan bodies), and its outputs."""
    from onnx import AttributeProto

    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                used |= _used_names(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    used |= _used_names(g)
    return used


def _drop_unused_initializers(model: Any) -> None:
    """Remove the initializers nothing reads any more (the float weights a quantization pass replaced);
    those also listed as graph inputs are kept."""
    used = _used_names(model.graph) | {i.name for i in model.graph.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _strip_node_metadata(model: Any) -> None:
    """Drop the exporter's per-node metadata (PyTorch module paths, stack traces: ~0.4 MB on MiniLM) once
    quantization has used it."""
    for node in model.graph.node:
        del node.metadata_props[:]


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
    - int8_dynamic: :func:`_per_token_int8` on the Linear nodes outside ``quant.float_layers``.
    - int8_static: ``quantize_static`` (QDQ, MinMax calibration on ``calibration``) on the Linear MatMul/Gemm
      nodes outside ``quant.float_layers``.
    - 8da4w / int4_weight_only: ``MatMulNBitsQuantizer`` (symmetric int4, blocks of ``group_size``) with
      ``accuracy_level`` 4 (activations quantized to int8 in the kernel) or 0 (float activations).

    With ``quant.embedding_bits == 8`` the embedding tables are stored int8 per row (:func:`_per_row_gather`).
    Nodes of ``adapter_modules`` stay float in every scheme (their weights are swapped at load time).
    """
    onnx = require("onnx", "onnx", "to quantize ONNX models")
    qz = require("onnxruntime.quantization", "onnxruntime", "to quantize ONNX models")
    model = onnx.load(str(fp32_path))
    del model.graph.value_info[:]  # let ORT re-infer shapes (see module docstring)
    details: dict[str, Any] = {"float_ops": ["LayerNormalization", "Softmax", "Gelu/Erf", "Add (residual)"]}
    gather = quant.embedding_bits == 8
    try:
        adapter_nodes = _adapter_nodes(model, adapter_modules) if adapter_modules else []
        # quantize_static rewrites a Gemm to "<name>_MatMul" (+ Add) before quantizing: exclude that name too
        adapter = [x for n in adapter_nodes for x in (n.name, f"{n.name}_MatMul")]
        adapter_inits = {x for n in adapter_nodes for x in n.input}
        if quant.scheme == "fp16":
            f16 = require("onnxruntime.transformers.float16", "onnxruntime", "for fp16 conversion")
            onnx.save(f16.convert_float_to_float16(model, keep_io_types=True), str(path))
            return {"weights": "float16", "float_ops": []}
        linear = _linear_nodes(model)
        kept = [(n, m) for n, m in linear if is_float_layer(m, quant.float_layers) or n in adapter]
        chosen = [n for n, m in linear if (n, m) not in kept]
        done = len(chosen)
        cleared, stage = tmp / "cleared.onnx", tmp / "stage.onnx"
        if quant.scheme == "int8_dynamic":
            done = _per_token_int8(model, set(chosen), per_channel=quant.per_channel)
            details.update(
                weights="int8 symmetric per output channel" if quant.per_channel else "int8 symmetric per tensor",
                activations="int8 per token, scaled at run time (MatMulInteger)",
                embeddings="float",
            )
        elif quant.scheme == "int8_static":
            onnx.save(model, str(cleared))
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
                weight_type=qz.QuantType.QUInt8,  # U8U8: exact on x86 without VNNI (see _per_token_int8)
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
        staged = model if quant.scheme == "int8_dynamic" else onnx.load(str(stage))
        if gather:
            _per_row_gather(staged, exclude=adapter_inits)
            details["embeddings"] = "int8 per row"
        _strip_node_metadata(staged)
        onnx.save(staged, str(path))
    except Exception as exc:
        raise ExportFailedError(
            f"onnxruntime quantization ({quant.scheme}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    details["quantized_linear_nodes"] = done
    details["float_linear_layers"] = sorted({m for _, m in kept})
    return details


def session_options(ort, threads: int | None = None):
    """ONNX Runtime session options for edgelm's sessions: ``threads`` intra-op threads (one inter-op), warnings
    off, and no telemetry event queue (edgelm also sets ``ORT_DISABLE_TELEMETRY``)."""
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OnnxSession:
    """An ONNX Runtime CPU session. ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 array}``.

    ``adapter``: another ``.adapter.data`` file to use instead of the one beside the model (same layout: an
    adapter of the same base exported by edgelm); ONNX Runtime reads it through
    ``SessionOptions.add_external_initializers_from_files_in_memory``.
    """

    def __init__(self, path: Path, threads: int | None = None, adapter: Path | None = None):
        ort = require("onnxruntime", "onnxruntime", "to run .onnx artifacts")
        path = check_artifact_file(path, SUFFIX, "ONNX")
        opts = session_options(ort, threads)
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
        self._dtypes = ["float32" if i.type == "tensor(float)" else "int64" for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {k: as_feed(feeds[k], d) for k, d in zip(self.input_names, self._dtypes, strict=True)}
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
    #: per-token int8 runs its scaling as separate ops: 1.17x the latency of ONNX Runtime's fused per-tensor
    #: kernels on the same MiniLM graph (12.5-13.2 against 10.7-11.2 ms, 1 thread, seq 128, VNNI Xeon)
    int8_efficiency = 0.85
    app_runtime = "onnxruntime"
