"""Writing directories and files so that a failed or interrupted run leaves nothing half-written: build in a
temp dir (or file) beside the destination, rename into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def install(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``, replacing an existing ``final`` only once the new one
    is in place (the old one is renamed aside, then removed)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_directory(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create the directory ``out`` atomically: ``fill(tmp)`` writes into a temp dir beside it, which
    :func:`install` moves to ``out`` at the end (an existing ``out`` is replaced); on any error the temp dir
    is removed and ``out`` is left as it was. Returns ``out`` (absolute)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        fill(tmp)
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file beside it, renamed over ``path`` at the end."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
