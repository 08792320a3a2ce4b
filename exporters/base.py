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
SCHEMES = ("fp32", "int8_dynamic")


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
    """

    scheme: str = "fp32"
    per_channel: bool = True
    embedding_bits: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UnsupportedQuantError(
                f"unknown quantization scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}"
            )
        if self.embedding_bits not in (None, 8):
            raise UnsupportedQuantError(f"embedding_bits must be 8 or None, not {self.embedding_bits!r}")

    @property
    def is_quantized(self) -> bool:
        return self.scheme != "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """

    path: Path
    format: str
    quant: QuantSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    export_seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

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
        }


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


def ensure_scheme(quant: QuantSpec, schemes: tuple[str, ...], fmt: str) -> None:
    """Raise :class:`UnsupportedQuantError` if ``quant.scheme`` is not one the format ``fmt`` can produce."""
    if quant.scheme not in schemes:
        raise UnsupportedQuantError(f"{fmt} export cannot do {quant.scheme!r}; it supports {', '.join(schemes)}")


def output_shape(module: Any, example_inputs: dict[str, Any]) -> tuple[int, ...]:
    """Shape of ``module``'s output after the batch axis, from one no-grad forward on the first example row
    (e.g. ``(384,)`` for MiniLM embeddings, ``(num_labels,)`` for logits)."""
    import torch

    with torch.no_grad():
        out = module(example_inputs["input_ids"][:1], example_inputs["attention_mask"][:1])
    return tuple(out.shape[1:])


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
            f"(or `pip install edgelm` for the full SDK) ({exc})"
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
                "(or `pip install edgelm` for the full SDK)"
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
    """Drop trailing columns where ``attention_mask`` is 0 in every row (right padding), keeping at least
    ``min_len`` columns. Outputs of a masked encoder do not depend on those columns."""
    mask = feeds.get("attention_mask")
    if mask is None:
        return feeds
    used = np.nonzero(mask.any(axis=0))[0]
    length = max(int(used[-1]) + 1 if used.size else 0, min_len)
    return {k: v[:, :length] for k, v in feeds.items()}
