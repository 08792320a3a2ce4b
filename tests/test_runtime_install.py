"""The runtime install (``pip install edgelm``: no torch, executorch or transformers) in a fresh virtual
environment: it reads profiles, validates a bundle exported elsewhere, and says in one line what an export
needs. Installs from the package registry (numpy, onnxruntime, ai-edge-litert, tokenizers, ...)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "edgelm", "exporters", "runtime_tests", "device_profiles")


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    """A venv with only ``pip install edgelm`` (from a copy of this checkout's sources); returns its bin/."""
    work = tmp_path_factory.mktemp("runtime-install")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(src)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if r.returncode != 0 and "No matching distribution" in r.stderr + r.stdout:
        pytest.skip(f"the package registry cannot be reached here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return venv / "bin"


def _run(bin_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a program of the venv outside this checkout, with no PYTHONPATH leading back into it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env, cwd=bin_dir
    )


def test_runtime_install_has_no_export_stack(runtime_env):
    for module in ("torch", "executorch", "transformers", "torchao", "litert_torch"):
        r = _run(runtime_env, "python", "-c", f"import {module}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, module
    r = _run(runtime_env, "python", "-c", "import onnxruntime, ai_edge_litert, tokenizers, edgelm.cli")
    assert r.returncode == 0, r.stderr


def test_runtime_install_reads_profiles_and_recipes(runtime_env):
    r = _run(runtime_env, "edgelm", "devices")
    assert r.returncode == 0 and "pixel8" in r.stdout, r.stderr
    r = _run(runtime_env, "edgelm", "recipe", "--device", "pixel8")
    assert r.returncode == 0 and json.loads(r.stdout)["device"] == "pixel8", r.stderr


def test_runtime_install_validates_a_bundle(runtime_env, pixel8_bundle, tmp_path):
    """ONNX and TFLite run and pass their checks; the .pte is skipped with the reason (no ExecuTorch here)."""
    bundle = tmp_path / "pixel8"
    shutil.copytree(pixel8_bundle, bundle, ignore=shutil.ignore_patterns("validation*"))
    r = _run(runtime_env, "edgelm", "validate", str(bundle), "--runs", "2", "--warmup", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((bundle / "validation.json").read_text())["runners"]["host"]
    status = {name: a["status"] for name, a in rec["artifacts"].items()}
    assert status == {
        "model.int8_dynamic.pte": "skipped",
        "model.int8_dynamic.tflite": "passed",
        "model.int8_dynamic.onnx": "passed",
    }
    assert "ExecuTorch's Python runtime is not installed" in rec["artifacts"]["model.int8_dynamic.pte"]["skipped"]
    assert all(
        a.get("runtime", {}) is None or "torch" not in (a.get("runtime") or {}) for a in rec["artifacts"].values()
    )


def test_runtime_install_says_what_an_export_needs(runtime_env, tmp_path):
    r = _run(runtime_env, "edgelm", "export", "--device", "pixel8", "--out", str(tmp_path / "dist"))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'edgelm[export]'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "dist" / "pixel8").exists()
