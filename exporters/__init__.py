"""exporters: one module per format, each a typed :class:`~exporters.base.Format` plug-in.

A format module defines one class satisfying the :class:`~exporters.base.Format` protocol (name, suffix,
the schemes it can produce and the reason for each it refuses, ``export(module, example_inputs, spec,
path, options) -> Artifact``, ``load(path, threads=, adapter=) -> Session``) and registers it with the
:func:`register` decorator. Adding a format is adding a module and its name to :data:`BUILTIN`; nothing
else changes. This package knows nothing of device profiles and never imports ``edgelm``; importing it
does not import torch (the format modules import torch only inside ``export``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from exporters.base import (
    SCHEMES,
    Artifact,
    ArtifactLoadError,
    ExporterError,
    ExportFailedError,
    ExportOptions,
    Format,
    QuantSpec,
    RuntimeNotInstalledError,
    Session,
    TensorSpec,
    UnsupportedQuantError,
    sha256_file,
)

#: The format modules shipped with edgelm, imported (cheaply: no torch) on first use of the registry.
BUILTIN = ("exporters.onnx", "exporters.executorch", "exporters.tflite")

_REGISTRY: dict[str, Format] = {}

__all__ = [
    "SCHEMES",
    "Artifact",
    "ArtifactLoadError",
    "ExportFailedError",
    "ExportOptions",
    "ExporterError",
    "Format",
    "QuantSpec",
    "RuntimeNotInstalledError",
    "Session",
    "TensorSpec",
    "UnsupportedQuantError",
    "format_for_path",
    "formats",
    "get",
    "load",
    "register",
    "sha256_file",
    "suffix",
]


def register(cls: type) -> type:
    """Class decorator: register one instance of a :class:`~exporters.base.Format` class under its ``name``.
    Raises ExporterError when the class does not satisfy the protocol, or its name or suffix is taken."""
    fmt = cls()
    if not isinstance(fmt, Format):
        raise ExporterError(f"{cls.__name__} does not implement the exporters.base.Format protocol")
    unknown = set(fmt.schemes) - set(SCHEMES)
    if unknown or set(fmt.unsupported) & set(fmt.schemes):
        raise ExporterError(f"{cls.__name__}: schemes {sorted(unknown)} are unknown, or refused and supported at once")
    for other in _REGISTRY.values():
        if other.name != fmt.name and other.suffix == fmt.suffix:
            raise ExporterError(f"format {fmt.name!r}: suffix {fmt.suffix} is already {other.name!r}'s")
    _REGISTRY[fmt.name] = fmt
    return cls


def _registry() -> dict[str, Format]:
    for module in BUILTIN:
        importlib.import_module(module)  # each registers its format
    return _REGISTRY


def formats() -> list[str]:
    """Registered format names, e.g. ``["onnx", "executorch", "tflite"]``: the built-in ones in
    :data:`BUILTIN`'s order whichever module was imported first, then the others as they registered."""
    registry = _registry()
    rank = {module: i for i, module in enumerate(BUILTIN)}
    return sorted(registry, key=lambda name: rank.get(type(registry[name]).__module__, len(BUILTIN)))


def get(fmt: str) -> Format:
    """The :class:`~exporters.base.Format` plug-in called ``fmt``. Raises ExporterError for an unknown format."""
    registry = _registry()
    if fmt not in registry:
        raise ExporterError(f"unknown format {fmt!r}; known formats: {', '.join(registry)}")
    return registry[fmt]


def suffix(fmt: str) -> str:
    """File suffix of a format (``".pte"`` for executorch)."""
    return get(fmt).suffix


def format_for_path(path: str | Path) -> str:
    """The format of an artifact file from its suffix (an early-exit cascade ``m.onnx.exits.json``: its
    segments' format). Raises ArtifactLoadError for an unknown suffix."""
    from exporters import cascade

    sfx = Path(cascade.inner_name(path)).suffix
    registry = _registry()
    for name, fmt in registry.items():
        if fmt.suffix == sfx:
            return name
    raise ArtifactLoadError(
        f"{path}: unknown artifact type {sfx!r}; edgelm runs {', '.join(f.suffix for f in registry.values())} files"
    )


def load(path: str | Path, threads: int | None = None, adapter: str | Path | None = None) -> Session:
    """Load an artifact in its own runtime: returns a Session whose ``run(feeds)`` maps numpy arrays to
    numpy arrays, named as the artifact's signature says. ``threads``: intra-op CPU threads (None: the
    runtime's default). ``adapter``: the weights file of another adapter of the same base (``.adapter.data``
    for ONNX, ``.adapter.ptd`` for ExecuTorch) to use instead of the one beside the artifact. An early-exit
    cascade (``*.exits.json``, :mod:`exporters.cascade`) loads its segments and runs them in order."""
    from exporters import cascade

    if cascade.is_cascade(path):
        if adapter is not None:
            raise ArtifactLoadError("an early-exit cascade has no swappable adapter weights")
        return cascade.load(Path(path), threads)
    return get(format_for_path(path)).load(
        Path(path), threads=threads, adapter=Path(adapter) if adapter is not None else None
    )
