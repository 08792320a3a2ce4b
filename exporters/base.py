"""Shared types of the exporter layer: QuantSpec, TensorSpec, Artifact, Session and the errors.

This module imports neither torch nor edgelm: it is safe on a board that has only numpy and a runtime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: Quantization schemes the exporter layer knows by name. Each format module declares which it can do.
#: - ``fp32``: no quantization.
#: - ``int8_dynamic``: int8 weights per output channel (symmetric) for every Linear/MatMul, activations
#:   quantized to int8 on the fly at run time; LayerNorm, Softmax, GELU and residual adds stay float.
#:   Where the format allows it the word-embedding table is stored as 8-bit too (per row).
#: - ``int8_static``: int8 weights per channel and int8 activations with scales fixed by calibration on
#:   representative inputs (PTQ). Only Linear layers are quantized and the layer groups in
#:   ``QuantSpec.float_layers`` (edgelm's default: the FFN down-projections, the group that loses accuracy,
#:   and the head, so that logits are never quantized) stay float; static int8 over every op collapses
#:   transformer accuracy (MiniLM cosine 0.38).
#: - ``8da4w``: int8 dynamic activations, int4 weights in groups of ``group_size`` (32) along the input axis.
#: - ``int4_weight_only``: int4 group-wise weights, float activations (weights dequantized in the kernel).
#: - ``fp16``: float16 weights (for GPU delegates; on CPU it halves size, not time).
SCHEMES = ("fp32", "fp16", "int8_dynamic", "int8_static", "8da4w", "int4_weight_only")

#: Layer groups of a BERT-family encoder that a quantization scheme can keep in float, as regular
#: expressions on the PyTorch module path (``base.encoder.layer.3.output.dense``).
LAYER_GROUPS = {
    "qkv": r"attention\.self\.(query|key|value)$",
    "attention_output": r"attention\.output\.dense$",
    "ffn_intermediate": r"intermediate\.dense$",
    "ffn_output": r"layer\.\d+\.output\.dense$",
    "head": r"(classifier(\.\w+)?|pooler\.dense)$",
}

#: Module-path pieces of PEFT adapter weights: LoRA's A and B matrices and the task layers an adapter saves
#: with it (peft's ``modules_to_save``, e.g. the classifier head). Exporting with ``adapter_modules`` stores
#: the weights of these modules in a separate, swappable file beside the artifact (see :func:`adapter_path`).
ADAPTER_MODULES = ("lora_A", "lora_B", "modules_to_save")


def adapter_path(artifact: Path, suffix: str) -> Path:
    """Where an artifact's swappable adapter weights live: ``<stem>.adapter<suffix>`` beside it
    (``model.onnx`` -> ``model.adapter.data``; ``model.pte`` -> ``model.adapter.ptd``)."""
    artifact = Path(artifact)
    return artifact.with_name(f"{artifact.stem}.adapter{suffix}")


def in_modules(module_path: str, pieces: tuple[str, ...]) -> bool:
    """Whether ``module_path`` (a PyTorch module path or an exported node name) contains one of ``pieces``."""
    return any(p in module_path for p in pieces)


class ExporterError(Exception):
    """Base of every error raised by ``exporters``; the message says what was wrong and what to do."""


class RuntimeNotInstalledError(ExporterError):
    """A package needed to export or run a format (onnxruntime, executorch, litert-torch ...) is missing."""


class UnsupportedQuantError(ExporterError):
    """The format cannot produce the requested quantization scheme (never silently replaced)."""


class ExportFailedError(ExporterError):
    """The underlying converter failed on this module (unsupported op, shape problem ...)."""


class ArtifactLoadError(ExporterError):
    """An artifact file is missing, corrupt, or not of the format its suffix claims."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one artifact.

    Attributes:
        scheme: one of :data:`SCHEMES` (``"fp32"``, ``"int8_dynamic"``).
        per_channel: int8 weight scales per output channel (True) or one per tensor (False).
        embedding_bits: store the word-embedding table with this many bits (8) where the format allows,
            or ``None`` to keep it float.
        group_size: weights per int4 scale group along the input axis (``8da4w``, ``int4_weight_only``).
        float_layers: names from :data:`LAYER_GROUPS` whose Linear layers stay float (``int8_static``; ONNX's
            ``int8_dynamic`` and 4-bit schemes honour it too).
    """

    scheme: str = "fp32"
    per_channel: bool = True
    embedding_bits: int | None = None
    group_size: int = 32
    float_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UnsupportedQuantError(
                f"unknown quantization scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}"
            )
        if self.embedding_bits not in (None, 8):
            raise UnsupportedQuantError(f"embedding_bits must be 8 or None, not {self.embedding_bits!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise UnsupportedQuantError(f"group_size must be 32, 64, 128 or 256, not {self.group_size!r}")
        unknown = [g for g in self.float_layers if g not in LAYER_GROUPS]
        if unknown:
            raise UnsupportedQuantError(
                f"unknown layer group(s) {', '.join(unknown)} in float_layers; known: {', '.join(LAYER_GROUPS)}"
            )

    @property
    def is_quantized(self) -> bool:
        return self.scheme != "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["float_layers"] = list(self.float_layers)
        return d

    @property
    def label(self) -> str:
        """Short name for tables: the scheme, plus the float layer groups of a static scheme."""
        return self.scheme + (f" (float: {'+'.join(self.float_layers)})" if self.float_layers else "")


def is_float_layer(module_path: str, groups: tuple[str, ...]) -> bool:
    """Whether the Linear at ``module_path`` belongs to one of the :data:`LAYER_GROUPS` in ``groups``."""
    import re

    return any(re.search(LAYER_GROUPS[g], module_path) for g in groups)


def require_calibration(calibration: Any, fmt: str) -> list[dict[str, Any]]:
    """Return ``calibration`` as a list of feeds, or raise :class:`UnsupportedQuantError` when it is empty:
    ``int8_static`` fixes activation scales from representative inputs and cannot run without them."""
    rows = list(calibration or [])
    if not rows:
        raise UnsupportedQuantError(
            f"{fmt} int8_static needs calibration inputs (pass --data with representative text); "
            "or use int8_dynamic, which needs none"
        )
    return rows


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an artifact: ``shape`` uses strings for symbolic dims (``"seq"``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Artifact:
    """An exported model file and what a runtime needs to know to run it.

    Attributes:
        path: the model file (``.onnx``, ``.pte``, ``.tflite``).
        format: registry name of the format (``"onnx"``, ``"executorch"``, ``"tflite"``).
        quant: the quantization actually applied.
        inputs / outputs: the signature; ids and mask are int64 for ONNX/ExecuTorch, int32 for TFLite.
        runtime: versions of the converter and runtime packages used, ``{package: version}``.
        details: format-specific facts (delegate, sequence buckets, ops kept in float ...).
        export_seconds: wall time of the export, s.
        companions: files the artifact needs beside it (the swappable adapter weights of an export with
            ``adapter_modules``, an early-exit cascade's segments); counted in :attr:`size_bytes` and listed
            with their sha256.
        companion_role: what the companion files are, as the manifest names them.
    """

    path: Path
    format: str
    quant: QuantSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    export_seconds: float = 0.0
    companions: list[Path] = field(default_factory=list)
    companion_role: str = "adapter weights"

    @property
    def size_bytes(self) -> int:
        """Bytes of the artifact and its companion files."""
        return self.path.stat().st_size + sum(Path(c).stat().st_size for c in self.companions)

    def sha256(self) -> str:
        return sha256_file(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "format": self.format,
            "quantization": self.quant.to_dict(),
            "sha256": self.sha256(),
            "size_bytes": self.size_bytes,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "runtime": dict(self.runtime),
            "details": dict(self.details),
            "export_seconds": round(self.export_seconds, 3),
            "companions": [
                {
                    "file": Path(c).name,
                    "role": self.companion_role,
                    "sha256": sha256_file(Path(c)),
                    "size_bytes": Path(c).stat().st_size,
                }
                for c in self.companions
            ],
        }


@dataclass(frozen=True)
class ExportOptions:
    """Typed options of :meth:`Format.export` (a misspelt option is a TypeError, never silently ignored).

    Attributes:
        output_name: the artifact's output tensor name (``"embeddings"``, ``"logits"``); every format's
            session returns its output under this name.
        calibration: feeds ``{"input_ids", "attention_mask"}`` int64 [1, seq] for schemes that calibrate
            activation scales (``int8_static``).
        adapter_modules: module-path pieces (e.g. :data:`ADAPTER_MODULES`) whose weights go to a swappable
            file beside the artifact (ONNX external data, ExecuTorch ``.ptd``); formats that cannot refuse.
        seq_buckets: sequence lengths of a static-shape format's signatures (TFLite; default: powers of two
            from 16 up to the example's length). Formats with a dynamic sequence axis ignore it.
        output_names: for a module that returns a tuple of tensors (an early-exit segment returns
            ``(hidden_states, logits)``), the name of each; ``output_name`` is then not used.
    """

    output_name: str = "output"
    calibration: tuple[dict[str, Any], ...] | list[dict[str, Any]] | None = None
    adapter_modules: tuple[str, ...] = ()
    seq_buckets: tuple[int, ...] | None = None
    output_names: tuple[str, ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The artifact's output names: ``output_names`` or ``(output_name,)``."""
        return tuple(self.output_names) if self.output_names else (self.output_name,)


@runtime_checkable
class Format(Protocol):
    """A format plug-in: one module in ``exporters/`` defines one class that satisfies this protocol and
    registers it with :func:`exporters.register`.

    Attributes:
        name: registry name (``"onnx"``); suffix: its file suffix (``".onnx"``).
        schemes: the quantization schemes (:data:`SCHEMES`) it can produce.
        unsupported: ``{scheme: why not}`` for each scheme of :data:`SCHEMES` it refuses.
        delegates: the profile backend names its artifacts run with (``"xnnpack"``).
        profile_runtimes: the key of a device profile's ``[runtimes]`` table that lists its backends
            (``"onnx_execution_providers"``).
        runtime_overhead_mb: resident memory of the runtime itself (library + arena), MB, for the cost model.
        int8_efficiency: share of the device's int8 GEMM rate its ``int8_dynamic`` artifacts reach end to end
            (1.0: fused int8 kernels), for the cost model; optional (a plug-in without it counts as 1.0).
        app_runtime: the runtime's name in the Android demo app's manifest (``"litert"``).
        separate_adapters: None when the format can keep adapter weights in a swappable file beside the
            artifact (``ExportOptions.adapter_modules``), else why not.
    """

    name: str
    suffix: str
    schemes: tuple[str, ...]
    unsupported: dict[str, str]
    delegates: tuple[str, ...]
    profile_runtimes: str
    runtime_overhead_mb: float
    app_runtime: str
    separate_adapters: str | None

    def check_installed(self) -> None:
        """Raise :class:`RuntimeNotInstalledError` unless the converter and runtime packages are installed."""
        ...

    def runtime_versions(self) -> dict[str, str]:
        """``{package: version}`` of the converter and runtime packages installed."""
        ...

    def export(
        self,
        module: Any,
        example_inputs: dict[str, Any],
        spec: QuantSpec,
        path: Path,
        options: ExportOptions | None = None,
    ) -> Artifact:
        """Export ``module`` (``forward(input_ids, attention_mask) -> float32 [batch, ...]``; example inputs
        int64 [1, max_seq]) to ``path`` quantized by ``spec``. Raises UnsupportedQuantError,
        RuntimeNotInstalledError or ExportFailedError."""
        ...

    def load(self, path: Path, *, threads: int | None = None, adapter: Path | None = None) -> Session:
        """Open an artifact in its runtime (``threads``: intra-op CPU threads; ``adapter``: another adapter's
        weights file). Raises ArtifactLoadError or RuntimeNotInstalledError."""
        ...


class ModuleFormat:
    """A :class:`Format` whose work is done by its module's functions ``check_installed()``,
    ``runtime_versions()``, ``export(module, example_inputs, quant, path, options)`` and ``load(path, threads,
    adapter)``: a format module subclasses it, sets the class attributes and registers the class."""

    name: str
    suffix: str
    schemes: tuple[str, ...]
    unsupported: dict[str, str] = {}
    delegates: tuple[str, ...]
    profile_runtimes: str
    runtime_overhead_mb: float
    int8_efficiency: float = 1.0
    app_runtime: str
    separate_adapters: str | None = None

    @property
    def _module(self) -> Any:
        import sys

        return sys.modules[type(self).__module__]

    def check_installed(self) -> None:
        self._module.check_installed()

    def runtime_versions(self) -> dict[str, str]:
        return self._module.runtime_versions()

    def export(
        self,
        module: Any,
        example_inputs: dict[str, Any],
        spec: QuantSpec,
        path: Path,
        options: ExportOptions | None = None,
    ) -> Artifact:
        return self._module.export(module, example_inputs, spec, path, options)

    def load(self, path: Path, *, threads: int | None = None, adapter: Path | None = None) -> Session:
        return self._module.load(path, threads, adapter)


@runtime_checkable
class Session(Protocol):
    """A loaded artifact. ``run`` takes and returns numpy arrays and imports no torch (ExecuTorch's own
    Python runtime is the one exception: executorch's bindings import torch themselves).

    ``run(feeds)``: ``feeds`` maps input names to arrays of shape [batch, seq_len] (any integer dtype; the
    session casts to the artifact's dtype and pads to a sequence bucket where the format needs one).
    Returns ``{output_name: float32 array [batch, ...]}``.
    """

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def ensure_scheme(quant: QuantSpec, schemes: tuple[str, ...], fmt: str, reasons: dict[str, str] | None = None) -> None:
    """Raise :class:`UnsupportedQuantError` if ``quant.scheme`` is not one the format ``fmt`` can produce;
    ``reasons`` maps such schemes to why not (added to the message). Never falls back silently."""
    if quant.scheme not in schemes:
        why = (reasons or {}).get(quant.scheme)
        raise UnsupportedQuantError(
            f"{fmt} export cannot do {quant.scheme!r}"
            + (f" ({why})" if why else "")
            + f"; it supports {', '.join(schemes)}"
        )


def output_shape(module: Any, example_inputs: dict[str, Any]) -> tuple[int, ...]:
    """Shape of ``module``'s output after the batch axis, from one no-grad forward on the first example row
    (e.g. ``(384,)`` for MiniLM embeddings, ``(num_labels,)`` for logits)."""
    return output_shapes(module, example_inputs)[0]


def output_shapes(module: Any, example_inputs: dict[str, Any]) -> list[tuple[int, ...]]:
    """Shape after the batch axis of each of ``module``'s outputs (one tensor or a tuple of them), from one
    no-grad forward on the first example row of every input."""
    import torch

    with torch.no_grad():
        out = module(*(v[:1] for v in example_inputs.values()))
    return [tuple(o.shape[1:]) for o in (out if isinstance(out, tuple | list) else (out,))]


def output_specs(
    module: Any, example_inputs: dict[str, Any], options: ExportOptions, dims: tuple[int | str, ...]
) -> list[TensorSpec]:
    """The float32 output specs of ``module`` named by ``options.names``: ``dims`` are the leading axes
    (``("batch",)`` or ``(1,)``); an output whose second axis is the input's sequence axis (hidden states
    [batch, seq, hidden]) keeps ``"seq"`` there. Raises ExportFailedError when the number of names differs
    from the number of outputs."""
    shapes = output_shapes(module, example_inputs)
    names = options.names
    if len(names) != len(shapes):
        raise ExportFailedError(f"the module returns {len(shapes)} outputs and {len(names)} names were given")
    max_seq = int(next(iter(example_inputs.values())).shape[1])
    specs = []
    for name, shape in zip(names, shapes, strict=True):
        rest: tuple[int | str, ...] = tuple(shape)
        if len(shape) >= 2 and shape[0] == max_seq:
            rest = ("seq", *shape[1:])
        specs.append(TensorSpec(name, "float32", (*dims, *rest)))
    return specs


def input_specs(example_inputs: dict[str, Any], int_dtype: str, dims: tuple[int | str, ...]) -> list[TensorSpec]:
    """The input specs of an export: one per example input, in order; integer inputs (token ids, masks) get
    ``int_dtype`` (``"int64"``, or ``"int32"`` for TFLite), float ones (an early-exit segment's hidden
    states) ``"float32"``; ``dims`` names the leading axes (``("batch", "seq")``), later axes keep their size."""
    specs = []
    for name, value in example_inputs.items():
        dtype = "float32" if value.is_floating_point() else int_dtype
        specs.append(TensorSpec(name, dtype, (*dims, *tuple(value.shape[2:]))))
    return specs


def as_feed(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as a contiguous array of a manifest dtype name (``"int64"``, ``"int32"``, ``"float32"``)."""
    return np.ascontiguousarray(array, dtype=np.dtype(dtype))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """``{distribution: version}`` for the installed ones among ``names`` (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def require(module: str, package: str, purpose: str):
    """Import ``module`` or raise :class:`RuntimeNotInstalledError` telling which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeNotInstalledError(
            f"{package} is not installed, and it is needed {purpose}: run `pip install {package}` "
            f"(or `pip install 'edgelm[export]'` for the whole export stack) ({exc})"
        ) from exc


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a top-level name is not executed)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_installed(*pairs: tuple[str, str], purpose: str) -> None:
    """Raise :class:`RuntimeNotInstalledError` for the first ``(module, package)`` that is not installed."""
    for module, package in pairs:
        if not is_installed(module):
            raise RuntimeNotInstalledError(
                f"{package} is not installed, and it is needed {purpose}: run `pip install {package}` "
                "(or `pip install 'edgelm[export]'` for the whole export stack)"
            )


def check_artifact_file(path: Path, suffix: str, fmt: str) -> Path:
    """Raise :class:`ArtifactLoadError` if ``path`` is missing or does not end in ``suffix``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactLoadError(f"{fmt} artifact not found: {path}")
    if path.suffix != suffix:
        raise ArtifactLoadError(f"{path} is not a {fmt} artifact (expected a {suffix} file)")
    return path


def split_rows(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split batched feeds [batch, seq] into a list of batch-1 feeds, for formats exported at batch 1."""
    batch = next(iter(feeds.values())).shape[0]
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(batch)]


def trim_padding(feeds: dict[str, np.ndarray], min_len: int = 2) -> dict[str, np.ndarray]:
    """Drop trailing columns (axis 1, the sequence axis of every input, hidden states included) where
    ``attention_mask`` is 0 in every row (right padding), keeping at least ``min_len`` columns. Outputs of a
    masked encoder do not depend on those columns."""
    mask = feeds.get("attention_mask")
    if mask is None:
        return feeds
    used = np.nonzero(mask.any(axis=0))[0]
    length = max(int(used[-1]) + 1 if used.size else 0, min_len)
    return {k: v[:, :length] for k, v in feeds.items()}
