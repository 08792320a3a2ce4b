"""exporters: one module per format behind one registry.

Each format module defines ``FORMAT``, ``SUFFIX``, ``SCHEMES`` (the quantization schemes it can
produce), ``DELEGATE``, ``export(module, example_inputs, quant, path, **options) -> Artifact`` and
``load(path, threads=None) -> Session``. Adding a format is adding a module and one line in
``_REGISTRY``; nothing else changes. This package knows nothing of device profiles and never imports
``edgelm``; importing it does not import torch (the format modules import torch only inside ``export``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from exporters.base import (
    SCHEMES,
    Artifact,
    ArtifactLoadError,
    ExporterError,
    ExportFailedError,
    QuantSpec,
    RuntimeNotInstalledError,
    Session,
    TensorSpec,
    UnsupportedQuantError,
    sha256_file,
)

# format name -> (module, suffix). Suffixes are listed here so that `load` and the registry's metadata
# need no import of the format module's heavy dependencies.
_REGISTRY: dict[str, tuple[str, str]] = {
    "onnx": ("exporters.onnx", ".onnx"),
    "executorch": ("exporters.executorch", ".pte"),
    "tflite": ("exporters.tflite", ".tflite"),
}

__all__ = [
    "SCHEMES",
    "Artifact",
    "ArtifactLoadError",
    "ExportFailedError",
    "ExporterError",
    "QuantSpec",
    "RuntimeNotInstalledError",
    "Session",
    "TensorSpec",
    "UnsupportedQuantError",
    "format_for_path",
    "formats",
    "get",
    "load",
    "sha256_file",
    "suffix",
]


def formats() -> list[str]:
    """Registered format names, e.g. ``["onnx", "executorch", "tflite"]``."""
    return list(_REGISTRY)


def get(fmt: str) -> ModuleType:
    """The format module for ``fmt``. Raises ExporterError for an unknown format."""
    if fmt not in _REGISTRY:
        raise ExporterError(f"unknown format {fmt!r}; known formats: {', '.join(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[fmt][0])


def suffix(fmt: str) -> str:
    """File suffix of a format (``".pte"`` for executorch)."""
    if fmt not in _REGISTRY:
        raise ExporterError(f"unknown format {fmt!r}; known formats: {', '.join(_REGISTRY)}")
    return _REGISTRY[fmt][1]


def format_for_path(path: str | Path) -> str:
    """The format of an artifact file from its suffix. Raises ArtifactLoadError for an unknown suffix."""
    sfx = Path(path).suffix
    for name, (_, s) in _REGISTRY.items():
        if s == sfx:
            return name
    raise ArtifactLoadError(
        f"{path}: unknown artifact type {sfx!r}; edgelm runs {', '.join(s for _, s in _REGISTRY.values())} files"
    )


def load(path: str | Path, threads: int | None = None, adapter: str | Path | None = None) -> Session:
    """Load an artifact in its own runtime: returns a Session whose ``run(feeds)`` maps numpy arrays to
    numpy arrays. ``threads``: intra-op CPU threads (None: the runtime's default). ``adapter``: the weights
    file of another adapter of the same base (``.adapter.data`` for ONNX, ``.adapter.ptd`` for ExecuTorch)
    to use instead of the one beside the artifact."""
    kwargs = {"adapter": Path(adapter)} if adapter is not None else {}
    return get(format_for_path(path)).load(Path(path), threads=threads, **kwargs)
