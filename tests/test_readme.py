"""The README's Python API examples run as written (in order, in an empty folder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.mark.minilm
def test_python_api_examples_run(tmp_path):
    blocks = _python_blocks("Python API")
    assert len(blocks) == 3
    for i, block in enumerate(blocks):  # each block in its own interpreter, as a user would paste it
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"block {i + 1}:\n{block}\n{r.stderr[-3000:]}"
        lines = r.stdout.strip().splitlines()
        if i == 0:  # report.passed, one ONNX artifact with a high cosine
            assert lines[-1].startswith("True [('model.int8_dynamic.onnx', 0.9"), lines
        if i == 1:  # (rows, 384) embeddings, and their cosine to the reference
            assert re.match(r"\(\d+, 384\) 0\.99", lines[-1]), lines
        if i == 2:
            assert lines[-1] == "True {'model.int8_dynamic.onnx': 'passed'}", lines
    assert (tmp_path / "dist" / "pixel8" / "validation.json").is_file()
