"""The host runner: artifacts on this machine, each in a new Python process running the torch-free target
script (:mod:`edgelm.validate.target`), so that its peak RSS is its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import edgelm
from edgelm import TELEMETRY_OFF
from edgelm.errors import ValidationError
from edgelm.validate.runner import (
    ArtifactRun,
    BundleJob,
    OnResult,
    RunResult,
    checksum_args,
    deliver,
    failure_line,
    read_target_output,
    target_options,
)
from exporters.cascade import inner_name


class HostRunner:
    """Runs artifacts on this machine, each in a new Python process (``python -m edgelm.validate.target``).

    Args:
        timeout_s: seconds one artifact may take (load + golden set + timing) before it is stopped.
    """

    name = "host"
    kind = "host"
    #: latency measured here is emulated (functional only, never device speed)
    emulated = False

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s

    def describe(self) -> dict:
        """What the runner is, for validation.json: ``runner``, ``kind``, ``emulated`` and target details."""
        import platform

        return {
            "runner": self.name,
            "kind": self.kind,
            "emulated": self.emulated,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        }

    def skip_reason(self, artifact: Path) -> str | None:
        """Why this runner does not run ``artifact`` at all (None: it does): a ``.pte`` on a runtime install
        without ExecuTorch's Python runtime."""
        import importlib.util

        if Path(inner_name(artifact)).suffix == ".pte" and importlib.util.find_spec("executorch") is None:
            return (
                f"{artifact.name}: ExecuTorch's Python runtime is not installed here (the runtime install has "
                "ONNX Runtime and LiteRT); pip install executorch==1.5.1 to run .pte artifacts"
            )
        return None

    def run_bundle(self, job: BundleJob, on_result: OnResult) -> None:
        """Run every artifact of ``job``, calling ``on_result`` as each finishes. An artifact that fails is
        reported as an error and the next one runs. Raises RunnerDropped when the target is lost."""
        for name in job.artifacts:
            path = job.bundle / name
            reason = self.skip_reason(path)
            if reason:
                on_result(ArtifactRun(name, skipped=reason))
                continue
            deliver(
                on_result,
                name,
                lambda path=path, name=name: self.run_artifact(
                    path,
                    job.golden,
                    threads=job.threads,
                    warmup=job.warmup,
                    runs=job.runs,
                    eval_set=job.eval_set,
                    checksums=job.checksums.get(name),
                ),
            )

    def _python(self) -> list[str]:
        """The command that starts the target's Python."""
        return [sys.executable]

    def _env(self) -> dict:
        src_root = str(Path(edgelm.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = src_root + os.pathsep + env.get("PYTHONPATH", "")
        env.update(TELEMETRY_OFF)
        return env

    def run_artifact(
        self,
        artifact: Path,
        golden: Path,
        *,
        threads: int | None,
        warmup: int = 5,
        runs: int = 20,
        adapter: Path | None = None,
        eval_set: Path | None = None,
        checksums: dict[str, str] | None = None,
    ) -> RunResult:
        """Run one artifact on the golden set (with ``adapter``: another adapter's weights file swapped in;
        with ``eval_set``: also on that eval set; with ``checksums``, ``{file beside it: sha256}`` that the
        target checks before loading anything). Raises ValidationError if it cannot run here, or if the
        process fails or times out."""
        reason = self.skip_reason(Path(artifact))
        if reason:
            raise ValidationError(reason)
        env = self._env()
        with tempfile.TemporaryDirectory(prefix="edgelm-run-") as tmp:
            cmd = [
                *self._python(),
                "-m",
                "edgelm.validate.target",
                str(artifact),
                "--golden",
                str(golden),
                "--out",
                tmp,
                *target_options(threads, warmup, runs, adapter, eval_set),
                *checksum_args(checksums),
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env)
            except subprocess.TimeoutExpired:
                raise ValidationError(
                    f"{artifact.name}: the {self.name} runner timed out after {self.timeout_s:.0f} s"
                ) from None
            if proc.returncode != 0:
                raise ValidationError(f"{artifact.name} failed on the {self.name} runner: {failure_line(proc)}")
            return read_target_output(Path(tmp))
