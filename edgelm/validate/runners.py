"""Runners: execute the target script (:mod:`edgelm.validate.target`) for an artifact somewhere and bring
back its outputs and timings: ``host`` (this machine) and ``emulator`` (arm64 under qemu, see
:mod:`edgelm.validate.emulator`). Each artifact runs in its own fresh process, so its peak RSS is its own.
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

    def _python(self) -> list[str]:
        """The command that starts the target's Python."""
        return [sys.executable]

    def _env(self) -> dict:
        src_root = str(Path(edgelm.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = src_root + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def check(self, artifact: Path) -> None:
        """Raise ValidationError if this runner cannot run ``artifact`` at all."""

    def run_artifact(self, artifact: Path, golden: Path, *, threads: int | None, warmup: int = 5,
                     runs: int = 20, adapter: Path | None = None) -> RunResult:
        """Run one artifact on the golden set (with ``adapter``: another adapter's weights file swapped in).
        Raises ValidationError if the process fails or times out."""
        self.check(Path(artifact))
        env = self._env()
        with tempfile.TemporaryDirectory(prefix="edgelm-run-") as tmp:
            cmd = [*self._python(), "-m", "edgelm.validate.target", str(artifact), "--golden", str(golden),
                   "--out", tmp, "--warmup", str(warmup), "--runs", str(runs)]
            if threads:
                cmd += ["--threads", str(threads)]
            if adapter is not None:
                cmd += ["--adapter", str(adapter)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise ValidationError(
                    f"{artifact.name}: the {self.name} runner timed out after {self.timeout_s:.0f} s"
                ) from None
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                msg = next((ln for ln in reversed(lines) if ln.startswith("edgelm target:")),
                           lines[-1] if lines else f"exit code {proc.returncode}")
                raise ValidationError(f"{artifact.name} failed on the {self.name} runner: {msg}")
            outputs = np.load(Path(tmp) / "outputs.npy")
            result = json.loads((Path(tmp) / "result.json").read_text())
        return RunResult(outputs=outputs, result=result)


class EmulatorRunner(HostRunner):
    """Runs artifacts as an arm64 program: ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 -m
    edgelm.validate.target ...`` with the sysroot's aarch64 wheels and ``QEMU_CPU=cpu`` (see
    :mod:`edgelm.validate.emulator`). Outputs are the arm64 kernels' own; latency is emulated, functional
    only. ``.pte`` artifacts need a sysroot set up with ExecuTorch (``edgelm emulator setup --executorch``).

    Raises EmulatorError (from the constructor) when qemu or the sysroot is missing.
    """

    name = "emulator"

    def __init__(self, sysroot: Path | None = None, cpu: str | None = None, timeout_s: float = 1800.0):
        from edgelm.validate import emulator

        super().__init__(timeout_s)
        self.qemu = emulator.qemu_binary()
        self.sysroot = Path(sysroot) if sysroot else emulator.default_sysroot()
        self.info = emulator.sysroot_info(self.sysroot)
        self.cpu = cpu or emulator.FALLBACK_CPU
        if self.cpu not in emulator.QEMU_CPUS:
            raise emulator.EmulatorError(f"qemu CPU model {self.cpu!r} is not one of {', '.join(emulator.QEMU_CPUS)}")

    def _python(self) -> list[str]:
        root = self.sysroot / "root"
        return [self.qemu, "-L", str(root), str(root / "usr" / "bin" / "python3.11")]

    def _env(self) -> dict:
        env = super()._env()
        env["PYTHONPATH"] = str(self.sysroot / "site") + os.pathsep + env["PYTHONPATH"]
        env["QEMU_CPU"] = self.cpu
        return env

    def check(self, artifact: Path) -> None:
        if artifact.suffix == ".pte" and not any(w.startswith("executorch") for w in self.info.get("wheels", [])):
            raise ValidationError(f"{artifact.name}: ExecuTorch under emulation needs the aarch64 torch and "
                                  "executorch wheels (about 1 GB): run `edgelm emulator setup --executorch`")
