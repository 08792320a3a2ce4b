"""Writing directories and files so that a failed or interrupted run leaves nothing half-written: build in a
temp dir (or file) beside the destination, rename into place at the end.

Temp dirs are named ``.<name>.partial-<pid>-<random>``: a later run removes those whose process is gone
(:func:`remove_stale_partials`), never the folder of a run still going. Finished folders get the normal mode
(``0o777 & ~umask``), not the 0700 of :func:`tempfile.mkdtemp`. Operating-system errors that are the
user's to fix (disk full, quota, permission, read-only file system) become one line (:func:`os_error_message`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgelm.errors import ModelError, OutputError

#: ``.<name>.partial-<pid>-<random>`` (a run's temp dir) or ``.<name>.old-<pid>`` (a replaced output)
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)(?:-.*)?")


def dir_mode() -> int:
    """The mode a new folder gets from ``mkdir``: ``0o777 & ~umask`` (0755 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def refuse_symlink(path: Path, what: str) -> None:
    """Raise OutputError if ``path`` is a symlink: results are never written through, or replace, a link."""
    if Path(path).is_symlink():
        raise OutputError(
            f"{what} {path} is a symlink (to {os.readlink(path)}): edgelm neither follows nor deletes it; "
            "remove the link or move it away and run again"
        )


def check_output_dir(out: str | os.PathLike, option: str = "--out", child: str | None = None) -> Path:
    """Check, before any work, that the folder ``out`` can be created or written: it is not an existing file,
    no existing parent of it is a file, and the nearest existing folder is writable (``os.access``; as root
    only a read-only file system fails that). ``child``: the folder the run will replace inside ``out``
    (``dist/<device>``), which must not be a file or a symlink. Returns ``out``. Raises OutputError."""
    out = Path(out)
    if child is not None:
        final = out / child
        refuse_symlink(final, "output folder")
        if final.exists() and not final.is_dir():
            raise OutputError(f"output folder {final} is an existing file: move it away or pass another {option}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is an existing file, not a folder: pass a folder path")
    probe = out
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise OutputError(f"{option} {out}: {probe} is a broken symlink; remove it or pass another folder")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{option} {out} cannot be created: {probe} is a file, not a folder; pass another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {out} is not writable ({probe}: no write permission or a read-only file system); "
            "pass a folder you can write"
        )
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def remove_stale_partials(parent: Path, name: str) -> list[Path]:
    """Remove ``.<name>.partial-<pid>-*`` and ``.<name>.old-<pid>`` folders in ``parent`` whose process is
    gone (a killed run's leftovers). Folders of live processes, and leftovers without a pid, are kept.
    Returns the removed paths."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.fullmatch(p.name)
        if not m or m["name"] != name or p.is_symlink() or not p.is_dir():
            continue
        if pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def make_partial_dir(parent: Path, name: str) -> Path:
    """A new temp dir ``parent/.<name>.partial-<pid>-<random>`` (after removing stale ones of dead runs)."""
    remove_stale_partials(parent, name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent))


def note_path(exc: BaseException, path: Path) -> None:
    """Give an OSError without a file name the path being written, for :func:`os_error_message`."""
    if isinstance(exc, OSError) and not exc.filename:
        exc.filename = str(path)


#: errno -> (what happened, what to do)
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and run again"),
    errno.EACCES: ("permission denied", "fix the permissions or pass another folder"),
    errno.EROFS: ("read-only file system", "pass a folder on a writable file system"),
}


def user_os_error(exc: BaseException) -> OSError | None:
    """The OSError in ``exc``'s chain (``__cause__``/``__context__``) that :func:`os_error_message` turns into
    one line (a converter that wraps a full disk in its own error), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_message(exc: OSError) -> str | None:
    """One line for an OSError the user must fix (disk full, quota, permission, read-only file system), else
    None: ``no space left on device at <path>: free space and run again``."""
    known = _OS_ERRORS.get(exc.errno)
    if known is None:
        return None
    where = f" at {exc.filename}" if exc.filename else ""
    return f"{known[0]}{where}: {known[1]}"


def install(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final`` with the normal folder mode (:func:`dir_mode`),
    replacing an existing ``final`` only once the new one is in place (the old one is renamed aside, then
    removed). Raises OutputError if ``final`` is a symlink or a file (neither is followed nor deleted)."""
    refuse_symlink(final, "output folder")
    if final.exists() and not final.is_dir():
        raise OutputError(f"output folder {final} is an existing file: move it away or pass another --out")
    os.chmod(tmp, dir_mode())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_directory(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create the directory ``out`` atomically: ``fill(tmp)`` writes into a temp dir beside it, which
    :func:`install` moves to ``out`` at the end (an existing ``out`` is replaced; a symlink ``out`` is
    refused); on any error the temp dir is removed and ``out`` is left as it was. Returns ``out`` (absolute)."""
    refuse_symlink(Path(out), "output folder")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_partial_dir(out.parent, out.name)
    try:
        fill(tmp)
        install(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        note_path(exc, out)
        raise
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file beside it, renamed over ``path`` at the end."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        note_path(exc, path)
        raise


@contextlib.contextmanager
def captured_output(log_path: Path) -> Iterator[None]:
    """Send everything written to fd 1 and 2 (Python and native code: converters' C++ logs) to
    ``log_path`` while the block runs. The CLI draws on a duplicate of the terminal's fd, so its progress
    bar stays visible."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # a full disk must not keep fd 1/2 on the log file
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def read_json_sidecar(path: Path, again: str) -> dict | None:
    """The JSON object in ``path`` (a checkpoint's ``early_exit.json``, ``hybrid_qrnn.json`` ...), or None when
    there is no such file. Raises ModelError ("<path> is corrupt (why): <again>") when it is unreadable or not
    an object."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is corrupt ({exc}): {again}") from None
    return doc
