"""Writing a benchmark's results: ``benchmarks/results/<name>.json`` and ``<name>.md`` side by side, each
written to a temporary file and renamed, so an interrupted run never leaves half a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, payload: dict, markdown: str | list[str], results_dir: Path = RESULTS) -> Path:
    """Write ``payload`` as ``<name>.json`` (indented, non-JSON values through ``str``) and ``markdown`` (a
    string, or lines joined with newlines) as ``<name>.md`` under ``results_dir``. Returns the Markdown path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown)
    written = []
    for suffix, content in ((".json", json.dumps(payload, indent=2, default=str)), (".md", text)):
        path = results_dir / f"{name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content.rstrip("\n") + "\n")
        os.replace(tmp, path)
        written.append(path)
    return written[-1]
