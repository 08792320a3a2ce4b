"""What every runner shares: the :class:`Runner` protocol, the job and result types, the target script's
command-line options and output, and the CLI's runner option checks.

Runners (one module each): :mod:`edgelm.validate.host` (this machine), :mod:`edgelm.validate.emulator`
(arm64 under qemu), :mod:`edgelm.validate.ssh` (a board), :mod:`edgelm.validate.adb` (an Android phone);
:func:`edgelm.validate.runners.make_runner` picks one from a ``--runner`` spec. Every runner has
``run_bundle(job, on_result)``: ``on_result`` is called once per artifact as its result arrives, so a caller
keeps what was received when the target drops (:class:`RunnerDropped`). numpy only: no torch.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgelm.errors import ValidationError


@dataclass
class RunResult:
    """What a runner brings back for one artifact.

    Attributes:
        outputs: float32 [N, ...], one row per golden input.
        result: the target script's result.json (latency samples in ms, peak RSS in MB, runtime versions).
        eval_outputs: float32 [M, ...], one row per eval-set input, when an eval set was run.
    """

    outputs: np.ndarray
    result: dict
    eval_outputs: np.ndarray | None = None


class RunnerDropped(ValidationError):
    """The connection to the target was lost (after one retry): the artifacts not yet run cannot be."""


@dataclass
class BundleJob:
    """What to run: artifacts of one bundle on its golden set (and an eval set).

    Attributes:
        bundle: the bundle directory (``dist/<device>/``).
        artifacts: artifact file names in the bundle, in the order to run them.
        golden: the golden set (``golden.npz``: int64 ``input_ids``/``attention_mask`` [N, seq_len] and the
            timing input).
        eval_set: an extra labeled eval set (``eval.npz``: int64 ``input_ids``/``attention_mask`` [M, seq_len],
            ``labels`` int64 [M]), or None.
        threads: CPU threads the runtime uses; warmup / runs: timing calls discarded / measured.
        checksums: per artifact, ``{file: sha256}`` of it and its companion files from the manifest; the
            target script refuses to load a file that differs.
    """

    bundle: Path
    artifacts: list[str]
    golden: Path
    eval_set: Path | None = None
    threads: int | None = None
    warmup: int = 5
    runs: int = 20
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)

    def checksum_options(self, artifact: str) -> list[str]:
        """``--sha256 FILE=HEX`` for the artifact and its companions: the target checks them before loading."""
        return checksum_args(self.checksums.get(artifact))

    def files(self, artifact: str) -> list[Path]:
        """The artifact and the companion files it loads: those its manifest entry lists (external data,
        a decoder's ``genai_config.json``) and swappable adapter weights (``.ptd``) found beside it."""
        path = self.bundle / artifact
        named = [self.bundle / f for f in self.checksums.get(artifact, {}) if f != artifact]
        adapters = sorted(p for p in self.bundle.glob(f"{path.stem}.*adapter*") if p.is_file())
        return [path, *dict.fromkeys([*named, *adapters])]


@dataclass
class ArtifactRun:
    """One artifact's outcome on a runner: a result, an error (it failed there), or a reason it was skipped."""

    artifact: str
    result: RunResult | None = None
    error: str | None = None
    skipped: str | None = None


OnResult = Callable[[ArtifactRun], None]


def deliver(on_result: OnResult, name: str, run: Callable[[], RunResult]) -> None:
    """Run one artifact with ``run`` and pass its result, or its ValidationError as an error, to ``on_result``.
    RunnerDropped propagates: the target is gone, the next artifacts cannot run either."""
    try:
        res = run()
    except RunnerDropped:
        raise
    except ValidationError as exc:
        on_result(ArtifactRun(name, error=str(exc)))
        return
    on_result(ArtifactRun(name, result=res))


def failure_line(proc: subprocess.CompletedProcess) -> str:
    """The line that says why a process failed: the target script's own ``edgelm target:`` line, else the
    last line of stderr, else the exit code."""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return next(
        (ln for ln in reversed(lines) if ln.startswith("edgelm target:")),
        lines[-1] if lines else f"exit code {proc.returncode}",
    )


def checksum_args(checksums: dict[str, str] | None) -> list[str]:
    """The target script's ``--sha256 FILE=HEX`` options: it checks those files before loading anything."""
    return [x for f, h in (checksums or {}).items() for x in ("--sha256", f"{f}={h}")]


def target_options(
    threads: int | None, warmup: int, runs: int, adapter: Path | None = None, eval_set: Path | None = None
) -> list[str]:
    """The target script's options (file arguments as given: local paths, or names in a remote directory)."""
    opts = ["--warmup", str(warmup), "--runs", str(runs)]
    if threads:
        opts += ["--threads", str(threads)]
    if adapter is not None:
        opts += ["--adapter", str(adapter)]
    if eval_set is not None:
        opts += ["--eval", str(eval_set)]
    return opts


def read_target_output(directory: Path) -> RunResult:
    """Read what the target script wrote into ``directory`` (outputs.npy, result.json, eval_outputs.npy).
    Raises ValidationError if a file is missing or unreadable."""
    try:
        ev = directory / "eval_outputs.npy"
        return RunResult(
            outputs=np.load(directory / "outputs.npy"),
            result=json.loads((directory / "result.json").read_text()),
            eval_outputs=np.load(ev) if ev.is_file() else None,
        )
    except (OSError, ValueError) as exc:
        raise ValidationError(f"the target script's results are missing or unreadable: {exc}") from None


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """``["K=V", ...]`` (``--remote-env``) -> ``{K: V}``. Raises ValidationError for an item without ``=``."""
    env = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise ValidationError(f"--remote-env {kv!r}: use K=V")
        k, v = kv.split("=", 1)
        env[k] = v
    return env


def check_timing(warmup: int, runs: int) -> None:
    """``--warmup`` must be 0 or more and ``--runs`` at least 1 (p50/p90 need a measurement). Raises
    ValidationError."""
    if warmup < 0:
        raise ValidationError(f"--warmup {warmup}: give 0 or more discarded timing runs")
    if runs < 1:
        raise ValidationError(f"--runs {runs}: give at least 1 measured timing run (p50/p90 need one)")


@runtime_checkable
class Runner(Protocol):
    """A place artifacts run: this host, the emulator, a board over SSH, a phone over adb.

    Attributes:
        name: the runner as validation.json and report.md name it (``"host"``, ``"ssh://pi@10.0.0.2"``).
        kind: ``"host"``, ``"emulator"``, ``"ssh"`` or ``"adb"``.
        emulated: latency measured there is functional only, never device speed.
    """

    name: str
    kind: str
    emulated: bool

    def describe(self) -> dict:
        """What the runner is, for validation.json (``runner``, ``kind``, ``emulated``, target details)."""
        ...

    def skip_reason(self, artifact: Path) -> str | None:
        """Why this runner does not run ``artifact`` at all (None: it does)."""
        ...

    def run_bundle(self, job: BundleJob, on_result: OnResult) -> None:
        """Run every artifact of ``job``, calling ``on_result`` as each finishes; raises RunnerDropped when
        the target is lost (results already passed on stay with the caller)."""
        ...

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
        """Run one artifact on the golden set (and ``eval_set``); ``checksums`` are checked before loading.
        Raises ValidationError."""
        ...
