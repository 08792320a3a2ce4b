"""Runners: execute the target script (:mod:`edgelm.validate.target`) for an artifact somewhere and bring
back its outputs and timings. This module has the ``host`` runner; each artifact runs in its own fresh
process, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import edgelm
from edgelm.errors import ValidationError


@dataclass
class RunResult:
    """What a runner brings back for one artifact.

    Attributes:
        outputs: float32 [N, ...], one row per golden input.
        result: the target script's result.json (latency samples in ms, peak RSS in MB, runtime versions).
    """

    outputs: np.ndarray
    result: dict


class HostRunner:
    """Runs artifacts on this machine, each in a new Python process (``python -m edgelm.validate.target``).

    Args:
        timeout_s: seconds one artifact may take (load + golden set + timing) before it is stopped.
    """

    name = "host"

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s

    def run_artifact(self, artifact: Path, golden: Path, *, threads: int | None, warmup: int = 5,
                     runs: int = 20, adapter: Path | None = None) -> RunResult:
        """Run one artifact on the golden set (with ``adapter``: another adapter's weights file swapped in).
        Raises ValidationError if the process fails or times out."""
        src_root = str(Path(edgelm.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = src_root + os.pathsep + env.get("PYTHONPATH", "")
        with tempfile.TemporaryDirectory(prefix="edgelm-run-") as tmp:
            cmd = [sys.executable, "-m", "edgelm.validate.target", str(artifact), "--golden", str(golden),
                   "--out", tmp, "--warmup", str(warmup), "--runs", str(runs)]
            if threads:
                cmd += ["--threads", str(threads)]
            if adapter is not None:
                cmd += ["--adapter", str(adapter)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise ValidationError(
                    f"{artifact.name}: the host runner timed out after {self.timeout_s:.0f} s"
                ) from None
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                msg = next((ln for ln in reversed(lines) if ln.startswith("edgelm target:")),
                           lines[-1] if lines else f"exit code {proc.returncode}")
                raise ValidationError(f"{artifact.name} failed on the host runner: {msg}")
            outputs = np.load(Path(tmp) / "outputs.npy")
            result = json.loads((Path(tmp) / "result.json").read_text())
        return RunResult(outputs=outputs, result=result)
