"""ExecuTorch export (torch.export -> PT2E quantization -> XNNPACK delegate -> .pte) and sessions.

Quantization (``int8_dynamic``): the XNNPACK PT2E quantizer with its symmetric, per-channel, dynamic
config (int8 weights per output channel, activations quantized on the fly), which XNNPACK runs as
dynamically-quantized fully-connected kernels. Only Linear layers are annotated by that config, so
LayerNorm, Softmax and GELU stay float (inside the XNNPACK delegate: see the graph rewrites below). With
``embedding_bits == 8`` every ``nn.Embedding`` table is stored int8 with one fp32 scale per row and read
through ``quantized_decomposed.embedding_byte`` (ExecuTorch's quantized kernel library has its out
variant; torchao's ``dequantize_affine`` has none at ``to_executorch``). On MiniLM that takes the .pte
from 58.6 MB to 23.6 MB at cosine 0.998.

``int8_static``: the same quantizer with its static config, annotating only the ``nn.Linear`` modules
outside ``QuantSpec.float_layers`` and calibrated by running the calibration inputs through the prepared
graph. ``8da4w``: torchao ``Int8DynamicActivationIntxWeightConfig`` (int4 weights in groups of
``group_size``, int8 dynamic activations per token), lowered by XNNPACK as ExecuTorch's own XNNPACK recipe
does. fp16 and int4 weight-only are refused with the reason (:data:`UNSUPPORTED`).

Signature: ``input_ids`` and ``attention_mask`` int64 [1, seq], seq dynamic from 2 to the example's length
(``torch.export.Dim``); batch is 1 (the session loops over rows). Output float32 [1, ...].

Graph rewrites for XNNPACK (:func:`_xnnpack_rewrites`, on the exported copy only): ExecuTorch 1.5's XNNPACK
partitioner has no LayerNorm, takes no reshape with a symbolic (dynamic) dimension and no ``expand``, and the
attention of Hugging Face's BERT-family code reshapes with the symbolic sequence length and multiplies 4-D
tensors (``expand`` + ``view`` + ``bmm`` once decomposed). As exported, MiniLM split into 50 XNNPACK calls
with 13 LayerNorms and 84 copies between them in ExecuTorch's portable (reference) kernels: 1.9-2.4x the
latency of the same model in LiteRT's one XNNPACK graph. edgelm exports LayerNorm as a per-token 4-D mean
(which XNNPACK runs) and attention as 3-D ``bmm`` over heads with reshapes whose only free axis is ``-1``:
14 XNNPACK calls, no LayerNorm or copy outside them, ~1.5x faster (16.8 -> 10.9 ms p50 at 1 thread, seq
128, on a VNNI Xeon; LiteRT 6.9 ms there). The same math to float rounding (max |diff| ~1e-6).
"""

from __future__ import annotations

import copy
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
    split_rows,
)

FORMAT = "executorch"
SUFFIX = ".pte"
SCHEMES = ("fp32", "int8_dynamic", "int8_static", "8da4w")
#: Why the other schemes are refused (the message of the UnsupportedQuantError).
UNSUPPORTED = {
    "fp16": "fp16 targets GPU delegates (Vulkan, CoreML, QNN), which edgelm does not lower to yet; "
    "XNNPACK on CPU gains nothing from it",
    "int4_weight_only": "XNNPACK has no weight-only int4 linear kernel; use 8da4w (int4 weights, int8 dynamic "
    "activations)",
}
DELEGATE = "XnnpackPartitioner"
#: The constant method that holds the program's output name (a string), read by :class:`ExecuTorchSession`.
SIGNATURE_METHOD = "output_names"
#: Constant method with the program's inputs, ``"name:dtype,..."`` (programs without it take int64
#: ``input_ids`` and ``attention_mask``).
INPUTS_METHOD = "input_names"
#: Profile backend names this exporter can lower to.
DELEGATES = ("xnnpack",)


def check_installed() -> None:
    """Raise RuntimeNotInstalledError unless executorch and torchao are installed."""
    require_installed(
        ("executorch", "executorch"), ("torchao", "torchao"), purpose="for ExecuTorch export and validation"
    )


def runtime_versions() -> dict[str, str]:
    return package_versions("torch", "executorch", "torchao")


def _xnnpack_rewrites(module: Any) -> dict[str, int]:
    """Rewrite ``module`` (in place, an export copy at batch 1) so XNNPACK delegates all of its encoder (see
    the module docstring): every ``nn.LayerNorm`` over one axis becomes an ``XnnpackLayerNorm`` (the same for
    inputs that are not [1, S, H]), and every BERT-family self-attention with absolute positions (a
    ``*SelfAttention`` module with ``query``/``key``/``value`` and ``attention_head_size``; relative-position
    and cross-attention modules are left as they are) runs :func:`_bmm_attention`. Returns how many of each
    were rewritten."""
    import types

    import torch

    layer_norm = _layer_norm_class()
    counts = {"layer_norms": 0, "attention_layers": 0}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm and len(child.normalized_shape) == 1:
                setattr(parent, name, layer_norm(child))
                counts["layer_norms"] += 1
            elif (
                type(child).__name__.endswith("SelfAttention")
                and all(hasattr(child, a) for a in ("query", "key", "value", "attention_head_size"))
                and getattr(child, "position_embedding_type", "absolute") == "absolute"
                and not getattr(child, "is_decoder", False)
                and not getattr(child, "_edgelm_bmm", False)
            ):
                child.forward = types.MethodType(_bmm_attention, child)
                child._edgelm_bmm = True
                counts["attention_layers"] += 1
    return counts


def _layer_norm_class() -> type:
    import torch

    class XnnpackLayerNorm(torch.nn.Module):
        """LayerNorm over the last axis of float32 [1, S, H], as ops XNNPACK delegates: the per-token mean and
        variance are 4-D means over the two innermost axes of [1, S, H, 1] (XNNPACK's global average pooling)."""

        def __init__(self, ln: torch.nn.LayerNorm):
            super().__init__()
            self.weight, self.bias, self.eps = ln.weight, ln.bias, float(ln.eps)
            self.hidden = int(ln.normalized_shape[0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 3:
                return torch.nn.functional.layer_norm(x, (self.hidden,), self.weight, self.bias, self.eps)
            x4 = x.contiguous().view(1, -1, self.hidden, 1)
            centered = x4 - x4.mean(dim=(2, 3), keepdim=True)
            var = (centered * centered).mean(dim=(2, 3), keepdim=True)
            y = (centered * torch.rsqrt(var + self.eps)).view(1, -1, self.hidden)
            if self.weight is not None:
                y = y * self.weight
            return y + self.bias if self.bias is not None else y

    return XnnpackLayerNorm


def _bmm_attention(self: Any, hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> tuple:
    """Scaled dot-product self-attention at batch 1 (replaces a BERT-family ``SelfAttention.forward``):
    hidden_states float32 [1, S, H], attention_mask float32 additive [1, 1, 1, S] (or None) -> (float32
    [1, S, heads * head_size], None). Heads go to the batch axis of 3-D ``bmm``; every reshape leaves only
    ``-1`` free, so XNNPACK delegates them with a dynamic S."""
    import torch

    size = int(self.attention_head_size)
    heads = int(getattr(self.query, "out_features", 0)) // size or int(self.num_attention_heads)  # pruned too

    def split(x: torch.Tensor) -> torch.Tensor:  # [1, S, heads * size] -> [heads, S, size]
        return x.view(-1, heads, size).permute(1, 0, 2)

    q, k, v = split(self.query(hidden_states)), split(self.key(hidden_states)), split(self.value(hidden_states))
    scores = torch.bmm(q, k.permute(0, 2, 1)) * getattr(self, "scaling", size**-0.5)
    if attention_mask is not None:
        scores = scores + attention_mask.view(1, 1, -1)
    context = torch.bmm(torch.softmax(scores, dim=-1), v).permute(1, 0, 2)
    return context.reshape(1, -1, heads * size), None


def _quantize_embeddings(module: Any) -> int:
    """Replace every ``nn.Embedding`` in ``module`` (in place) by an int8 per-row table. Returns the count."""
    import torch

    require(
        "executorch.exir.passes._quant_patterns_and_replacements", "executorch", "for the 8-bit embedding op"
    )  # registers torch.ops.quantized_decomposed.embedding_byte

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


def _pt2e_int8(
    module: Any,
    args: tuple,
    dynamic_shapes: tuple,
    quant: QuantSpec,
    calibration: list[dict[str, Any]],
    details: dict[str, Any],
    adapter_modules: tuple[str, ...] = (),
    names: tuple[str, ...] = ("input_ids", "attention_mask"),
) -> Any:
    """PT2E int8 with the XNNPACK quantizer: dynamic (no calibration) or static (observers run over
    ``calibration``, feeds keyed by the input ``names``). Static annotates only ``nn.Linear`` modules, minus ``quant.float_layers``. Modules
    of ``adapter_modules`` stay float."""
    import torch

    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch", "for the XNNPACK quantizer")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "torchao", "for PT2E quantization")
    dynamic = quant.scheme == "int8_dynamic"
    config = xq.get_symmetric_quantization_config(is_per_channel=quant.per_channel, is_dynamic=dynamic)
    quantizer = xq.XNNPACKQuantizer()
    modules = dict(module.named_modules(remove_duplicate=False))
    linears = [name for name, m in modules.items() if isinstance(m, torch.nn.Linear)]
    if dynamic and not adapter_modules:
        quantizer.set_global(config)
    else:
        # every path to a Linear: a wrapper may reach one module by two names (``model.bert...`` and
        # ``base...``), and the quantizer matches the name the forward pass used
        kept = [
            name for name in linears if is_float_layer(name, quant.float_layers) or in_modules(name, adapter_modules)
        ]
        for name in linears:
            if name not in kept:
                quantizer.set_module_name(name, config)
        aliases: dict[int, list[str]] = {}
        for name in kept:  # one name per module, the wrapper's short path where it has one
            aliases.setdefault(id(modules[name]), []).append(name)
        details["float_linear_layers"] = sorted(
            min(names, key=lambda n: (n.startswith("model."), len(n))) for names in aliases.values()
        )
    graph = torch.export.export(module, args, dynamic_shapes=dynamic_shapes).module()
    graph = pt2e.prepare_pt2e(graph, quantizer)
    if dynamic:
        graph(*args)  # dynamic quantization needs no calibration; one pass initialises observers
        details["quantized_ops"] = ["linear (int8 weights per channel, dynamic int8 activations)"]
    else:
        for row in calibration:
            graph(*(torch.as_tensor(row[k], dtype=a.dtype) for k, a in zip(names, args, strict=True)))
        details["quantized_ops"] = [
            f"linear (int8 weights per channel, static int8 activations from {len(calibration)} calibration inputs)"
        ]
    details["float_ops"] = ["layer_norm", "softmax", "gelu", "add (residual)"]
    return pt2e.convert_pt2e(graph)


def _torchao_8da4w(
    module: Any, quant: QuantSpec, details: dict[str, Any], adapter_modules: tuple[str, ...] = ()
) -> None:
    """torchao ``Int8DynamicActivationIntxWeightConfig``: int4 symmetric weights in groups of
    ``quant.group_size``, int8 dynamic activations, on every Linear (in place); XNNPACK lowers it."""
    import torch

    tq = require("torchao.quantization", "torchao", "for 8da4w quantization")
    granularity = require("torchao.quantization.granularity", "torchao", "for 8da4w quantization")
    utils = require("torchao.utils", "torchao", "for 8da4w quantization")
    seen: set[int] = set()

    def once(m: Any, _fqn: str) -> bool:  # a wrapper may reach one Linear by two paths (model.bert / base)
        if not isinstance(m, torch.nn.Linear) or id(m) in seen or in_modules(_fqn, adapter_modules):
            return False
        seen.add(id(m))
        return True

    tq.quantize_(
        module,
        tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=granularity.PerGroup(quant.group_size)
        ),
        filter_fn=once,
    )
    utils.unwrap_tensor_subclass(module)  # plain tensors + quant ops, as ExecuTorch's own XNNPACK recipe does
    details["quantized_ops"] = [f"linear (int4 weights, groups of {quant.group_size}; dynamic int8 activations)"]
    details["float_ops"] = ["layer_norm", "softmax", "gelu", "add (residual)"]


def export(
    module: Any,
    example_inputs: dict[str, Any],
    quant: QuantSpec,
    path: Path,
    options: ExportOptions | None = None,
) -> Artifact:
    """Export ``module`` (forward(input_ids, attention_mask) -> float32 [1, ...]) to a ``.pte`` file.

    Args:
        example_inputs: ``{"input_ids", "attention_mask"}`` int64 tensors [1, max_seq]; the sequence axis is
            exported dynamic in [2, max_seq].
        quant: one of :data:`SCHEMES` (see module docstring). The caller's module is not modified.
        path: the ``.pte`` file to write.
        options: :class:`~exporters.base.ExportOptions`: the output name (stored in the program as the
            constant method ``output_names``, which :class:`ExecuTorchSession` reads), ``calibration`` feeds
            for ``int8_static``, and ``adapter_modules``: module-path pieces (e.g. :data:`~exporters.base.ADAPTER_MODULES`) whose weights go to
            ``<stem>.adapter.ptd`` beside the program (ExecuTorch program-data separation) instead of into it.
            Those modules stay float and outside the XNNPACK delegate (XNNPACK keys its weights by content
            hash, which would tie the program to one adapter); every adapter of one base then shares a
            byte-identical ``.pte`` and differs only in its ``.ptd``.
    Raises:
        UnsupportedQuantError, RuntimeNotInstalledError, ExportFailedError.
    """
    options = options or ExportOptions()
    calibration, adapter_modules = options.calibration, options.adapter_modules
    ensure_scheme(quant, SCHEMES, "ExecuTorch", UNSUPPORTED)
    if quant.scheme == "int8_static":
        calibration = require_calibration(calibration, "ExecuTorch")
    import torch

    exir = require("executorch.exir", "executorch", "to export .pte programs")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch", "for the XNNPACK delegate")
    path = Path(path)
    start = time.perf_counter()
    names = tuple(example_inputs)
    args = tuple(example_inputs.values())
    max_seq = int(args[0].shape[1])
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    dynamic_shapes = tuple({1: seq} for _ in args)
    inputs = input_specs(example_inputs, "int64", (1, "seq"))
    outputs = output_specs(module, example_inputs, options, (1,))
    signature = {
        SIGNATURE_METHOD: ",".join(o.name for o in outputs),
        INPUTS_METHOD: ",".join(f"{i.name}:{i.dtype}" for i in inputs),
    }
    module = copy.deepcopy(module).eval()
    details: dict[str, Any] = {"delegate": DELEGATE, "max_seq_len": max_seq}
    try:
        with torch.no_grad():
            details["xnnpack_rewrites"] = _xnnpack_rewrites(module)
            if quant.is_quantized and quant.embedding_bits == 8:
                details["embedding_tables_int8"] = _quantize_embeddings(module)
            if quant.scheme in ("int8_dynamic", "int8_static"):
                module = _pt2e_int8(
                    module, args, dynamic_shapes, quant, calibration or [], details, adapter_modules, names
                )
            elif quant.scheme == "8da4w":
                _torchao_8da4w(module, quant, details, adapter_modules)
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
            partitioner = _base_partitioner(xnn, adapter_modules) if adapter_modules else xnn.XnnpackPartitioner()
            edge = exir.to_edge_transform_and_lower(exported, partitioner=[partitioner], constant_methods=signature)
            data = adapter_path(path, ".ptd")
            if adapter_modules:
                tag = data.name[: -len(".ptd")]
                lower = tuple(m.lower() for m in adapter_modules)  # placeholder names are lower-cased paths
                program = edge.to_executorch(
                    exir.ExecutorchBackendConfig(
                        external_constants=lambda n: tag if in_modules(n.name.lower(), lower) else None
                    )
                )
            else:
                program = edge.to_executorch()
            buffer = program.buffer
            if adapter_modules:
                program.write_tensor_data_to_file(str(path.parent))
    except Exception as exc:
        raise ExportFailedError(f"ExecuTorch export failed: {type(exc).__name__}: {exc}") from exc
    companions = []
    if adapter_modules:
        if not data.is_file():
            raise ExportFailedError(
                f"no weights of modules matching {', '.join(adapter_modules)} in the program: "
                "the model has no adapter to store separately"
            )
        companions.append(data)
        details["adapter_file"] = data.name
    path.write_bytes(buffer)
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime_versions(),
        details=details,
        export_seconds=time.perf_counter() - start,
        companions=companions,
    )


def _base_partitioner(xnn: Any, adapter_modules: tuple[str, ...]) -> Any:
    """An XNNPACK partitioner that leaves every node of ``adapter_modules`` to the portable kernels."""

    def in_adapter(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return any(in_modules(str(p), adapter_modules) for p, _ in stack.values())

    class BasePartitioner(xnn.XnnpackPartitioner):
        def get_matched_nodes_from_configs(self, ep):
            groups = super().get_matched_nodes_from_configs(ep)
            return [g for g in groups if not any(n.op == "call_function" and in_adapter(n) for n in g)]

        def ops_to_not_decompose(self, ep):
            ops, keep = super().ops_to_not_decompose(ep)
            return ops, (lambda n: keep(n) and not in_adapter(n))

    return BasePartitioner()


def open_program(path: Path, threads: int | None = None, data_path: Path | None = None):
    """Load the ``.pte`` at ``path`` in ExecuTorch's Python runtime with its quantized kernels, XNNPACK's thread
    pool set to ``threads`` first (re-setting it after loading a method invalidates the method); ``data_path``:
    a ``.ptd`` of external weights. Returns ``(torch, program)``. Raises RuntimeNotInstalledError or
    ArtifactLoadError."""
    torch = require("torch", "torch", "by ExecuTorch's Python runtime")
    runtime = require("executorch.runtime", "executorch", "to run .pte artifacts")
    require("executorch.kernels.quantized", "executorch", "for the quantized kernels of .pte artifacts")
    try:
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))
        return torch, runtime.Runtime.get().load_program(path, data_path=data_path)
    except Exception as exc:
        raise ArtifactLoadError(f"ExecuTorch could not load {path}: {exc}") from exc


class ExecuTorchSession:
    """A ``.pte`` program loaded in ExecuTorch's Python runtime (portable + quantized kernels, XNNPACK).

    ``threads`` sets XNNPACK's thread pool *before* the program is loaded (re-setting it after loading a
    method invalidates the method). ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 [batch, ...]}``;
    rows run one at a time (the program is exported at batch 1). A program exported with adapter modules
    reads their weights from ``adapter`` (a ``.ptd`` file), by default ``<stem>.adapter.ptd`` beside it.
    The output is named as the program's ``output_names`` constant method says (``"output"`` for a program
    without one).
    """

    def __init__(self, path: Path, threads: int | None = None, adapter: Path | None = None):
        path = check_artifact_file(path, SUFFIX, "ExecuTorch")
        data = Path(adapter) if adapter is not None else adapter_path(path, ".ptd")
        if adapter is not None and not data.is_file():
            raise ArtifactLoadError(f"adapter weights not found: {data}")
        self._torch, program = open_program(path, threads, data if data.is_file() else None)
        try:
            self._method = program.load_method("forward")
            methods = program.method_names

            def constant(name: str, default: str) -> list[str]:
                value = str(program.load_method(name).execute([])[0]) if name in methods else default
                return value.split(",")

            self.output_names = constant(SIGNATURE_METHOD, "output")
            inputs = [x.split(":") for x in constant(INPUTS_METHOD, "input_ids:int64,attention_mask:int64")]
        except Exception as exc:
            raise ArtifactLoadError(f"ExecuTorch could not load {path}: {exc}") from exc
        self.input_names = [name for name, _ in inputs]
        self._dtypes = [dtype for _, dtype in inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        outs: list[list[np.ndarray]] = [[] for _ in self.output_names]
        for row in split_rows(feeds):
            tensors = [
                torch.from_numpy(as_feed(row[k], d)) for k, d in zip(self.input_names, self._dtypes, strict=True)
            ]
            for i, value in enumerate(self._method.execute(tensors)[: len(self.output_names)]):
                outs[i].append(value.numpy().copy())
        return {name: np.concatenate(rows, axis=0) for name, rows in zip(self.output_names, outs, strict=True)}


def load(path: Path, threads: int | None = None, adapter: Path | None = None) -> ExecuTorchSession:
    """Open a ``.pte`` artifact (``adapter``: a ``.ptd`` of adapter weights to use, see
    :class:`ExecuTorchSession`). Raises ArtifactLoadError or RuntimeNotInstalledError."""
    return ExecuTorchSession(path, threads, adapter)


@register
class ExecuTorchFormat(ModuleFormat):
    """ExecuTorch (``.pte``) lowered to the XNNPACK delegate; runs in ExecuTorch's Python runtime."""

    name = FORMAT
    suffix = SUFFIX
    schemes = SCHEMES
    unsupported = UNSUPPORTED
    delegates = DELEGATES
    profile_runtimes = "executorch_backends"
    runtime_overhead_mb = 8.0
    app_runtime = "executorch"
