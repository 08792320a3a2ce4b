"""Runners: run a bundle's artifacts on a target and bring back their outputs and timings.

``host`` (this machine), ``emulator`` (arm64 under qemu, see :mod:`edgelm.validate.emulator`),
``ssh://user@host[:port]`` (a board) and ``adb[:serial]`` (an Android phone). The first three execute the
torch-free target script (:mod:`edgelm.validate.target`), each artifact in its own fresh process so that
its peak RSS is its own; the adb runner runs the Android demo app's instrumented on-device check and reads
the results JSON it writes (:data:`DEVICE_RESULTS_SCHEMA`).

Every runner has ``run_bundle(job, on_result)``: ``on_result`` is called once per artifact as its result
arrives, so a caller keeps what was received when the target drops (:class:`RunnerDropped`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import edgelm
from edgelm import TELEMETRY_OFF
from edgelm.bundle import android_assets
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
        """The artifact and the companion files it loads (external data, ``.ptd``) found beside it."""
        path = self.bundle / artifact
        return [path, *sorted(p for p in self.bundle.glob(f"{path.stem}.*adapter*") if p.is_file())]


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

        if artifact.suffix == ".pte" and importlib.util.find_spec("executorch") is None:
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


class EmulatorRunner(HostRunner):
    """Runs artifacts as an arm64 program: ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 -m
    edgelm.validate.target ...`` with the sysroot's aarch64 wheels and ``QEMU_CPU=cpu`` (see
    :mod:`edgelm.validate.emulator`). Outputs are the arm64 kernels' own; latency is emulated, functional
    only. ``.pte`` artifacts need a sysroot set up with ExecuTorch (``edgelm emulator setup --executorch``).

    Raises EmulatorError (from the constructor) when qemu or the sysroot is missing.
    """

    name = kind = "emulator"
    emulated = True

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

    def describe(self) -> dict:
        return {
            "runner": self.name,
            "kind": self.kind,
            "emulated": self.emulated,
            "machine": "aarch64 (qemu user mode)",
            "qemu_cpu": self.cpu,
            "sysroot": str(self.sysroot),
            "qemu": self.qemu,
            "executorch": self._has_executorch(),
        }

    def _has_executorch(self) -> bool:
        return any(w.startswith("executorch") for w in self.info.get("wheels", []))

    def skip_reason(self, artifact: Path) -> str | None:
        if artifact.suffix == ".pte" and not self._has_executorch():
            return (
                f"{artifact.name}: ExecuTorch under emulation is opt-in: it needs the aarch64 torch and "
                "executorch wheels (about 1 GB); run `edgelm emulator setup --executorch`"
            )
        return None


#: What the target side needs on a board: the torch-free target script and the exporters' sessions.
PAYLOAD_FILES = ("edgelm/__init__.py", "edgelm/validate/__init__.py", "edgelm/validate/target.py")
PAYLOAD_PACKAGES = ("exporters",)


def target_payload(directory: Path) -> Path:
    """Copy the target-side code (numpy + runtime only: ``edgelm.validate.target`` and ``exporters``) into
    ``directory`` so that ``python -m edgelm.validate.target`` runs there. Returns ``directory``."""
    src = Path(edgelm.__file__).resolve().parent.parent
    for rel in PAYLOAD_FILES:
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, directory / rel)
    for pkg in PAYLOAD_PACKAGES:
        (directory / pkg).mkdir(parents=True, exist_ok=True)
        for f in (src / pkg).glob("*.py"):
            shutil.copy2(f, directory / pkg / f.name)
    return directory


class SSHRunner(HostRunner):
    """Runs artifacts on a board over SSH: ``ssh://user@host[:port]``.

    Every call uses ``ssh``/``scp`` with ``BatchMode=yes`` (never a password prompt), the given key file and a
    pinned ``known_hosts`` file (``StrictHostKeyChecking=yes``: an unknown or changed host key is refused),
    and every remote argument is shell-quoted. Per bundle: a temporary directory on the board (``mktemp -d``)
    gets the target payload (:func:`target_payload`), the golden set and the eval set once; then per artifact
    the artifact and its companion files are copied in, ``python -m edgelm.validate.target`` runs there, and
    its results are copied back before the next one starts. The directory is removed at the end. A dropped
    connection or a timeout (ssh exit 255, or no answer within ``timeout_s``) is retried once, then raises
    :class:`RunnerDropped`; results already passed to ``on_result`` stay with the caller.

    Args:
        target: ``ssh://user@host[:port]`` (port 22 by default).
        key_file: the private key to log in with.
        known_hosts: the pinned known_hosts file holding the board's host key.
        remote_python: the command that starts Python on the board (split with shlex), e.g. ``python3``, or
            ``qemu-aarch64-static -L /sysroot/root /sysroot/root/usr/bin/python3.11`` for an emulated board.
        remote_env: environment variables set for the target script on the board.
    Raises:
        ValidationError: a malformed target, or a key / known_hosts file that does not exist.
    """

    name = kind = "ssh"

    def __init__(
        self,
        target: str,
        *,
        key_file: Path,
        known_hosts: Path,
        remote_python: str = "python3",
        remote_env: dict[str, str] | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: int = 10,
    ):
        super().__init__(timeout_s)
        m = re.fullmatch(r"ssh://([A-Za-z0-9._-]+)@([A-Za-z0-9.:_-]+?)(?::(\d+))?", target)
        if not m:
            raise ValidationError(f"bad SSH target {target!r}: use ssh://user@host[:port]")
        self.user, self.host, self.port = m.group(1), m.group(2), int(m.group(3) or 22)
        for what, value in (("user name", self.user), ("host", self.host)):
            if value.startswith("-"):  # ssh/scp would read it as an option (-oProxyCommand=...)
                raise ValidationError(
                    f"bad SSH target {target!r}: the {what} {value!r} starts with '-'; use ssh://user@host[:port]"
                )
        for what, opt, p in (("key file", "--key", key_file), ("known_hosts file", "--known-hosts", known_hosts)):
            if p is None:
                raise ValidationError(
                    f"the SSH runner needs a {what} ({opt} FILE): edgelm never prompts for a "
                    "password and never trusts an unknown host key"
                )
            if not Path(p).is_file():
                raise ValidationError(f"SSH {what} not found: {p}")
        self.key_file, self.known_hosts = Path(key_file), Path(known_hosts)
        self.remote_python, self.remote_env = remote_python, dict(remote_env or {})
        self.emulated = "qemu" in remote_python  # an arm64 board emulated on the far side
        self.connect_timeout_s = connect_timeout_s
        self.name = f"ssh://{self.user}@{self.host}:{self.port}"

    def target_env(self) -> dict[str, str]:
        """The environment of the target script on the board: ``remote_env`` with ONNX Runtime's telemetry
        off (:data:`TELEMETRY_OFF`, which ``remote_env`` cannot turn back on)."""
        return {"PYTHONPATH": ".", **self.remote_env, **TELEMETRY_OFF}

    def describe(self) -> dict:
        return {
            "runner": self.name,
            "kind": self.kind,
            "emulated": self.emulated,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "remote_python": self.remote_python,
        }

    def _options(self) -> list[str]:
        return [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={self.connect_timeout_s}",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.key_file),
        ]

    def ssh_command(self, remote: list[str]) -> list[str]:
        """The local argv that runs ``remote`` (argv, each element quoted) on the board."""
        return [
            "ssh",
            *self._options(),
            "-p",
            str(self.port),
            f"{self.user}@{self.host}",
            " ".join(shlex.quote(a) for a in remote),
        ]

    def scp_command(self, sources: list[str], dest: str) -> list[str]:
        """The local argv that copies ``sources`` to ``dest`` (a remote path is written ``:path``)."""

        def where(p: str) -> str:
            return f"{self.user}@{self.host}:{shlex.quote(p[1:])}" if p.startswith(":") else p

        return ["scp", "-q", "-r", *self._options(), "-P", str(self.port), *[where(s) for s in sources], where(dest)]

    def _call(self, argv: list[str], what: str) -> str:
        """Run ``argv``; retry once on a dropped connection (exit 255) or a timeout. Raises ValidationError
        when the remote command fails, RunnerDropped when the connection fails twice."""
        last = ""
        for _ in range(2):
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                last = f"no answer within {self.timeout_s:.0f} s"
                continue
            if proc.returncode == 0:
                return proc.stdout
            last = failure_line(proc)
            if proc.returncode != 255:  # the remote command failed: retrying would not help
                raise ValidationError(f"{what} on {self.name} failed: {last}")
        raise RunnerDropped(
            f"{what} on {self.name} failed twice (connection dropped or timed out): {last}. "
            "Check that the board is reachable and its host key is in the known_hosts file"
        )

    def _open(self, shared: list[Path]) -> str:
        """Make the board's work directory and copy the payload and ``shared`` files in; returns its path."""
        remote = self._call(
            self.ssh_command(["mktemp", "-d", "/tmp/edgelm-run-XXXXXX"]), "creating a work directory"
        ).strip()
        with tempfile.TemporaryDirectory(prefix="edgelm-ssh-") as tmp:
            stage = target_payload(Path(tmp))
            for f in shared:
                shutil.copy2(f, stage / f.name)
            self._call(
                self.scp_command([str(p) for p in sorted(stage.iterdir())], f":{remote}/"),
                "copying the target script and golden set",
            )
        return remote

    def _close(self, remote: str) -> None:
        try:
            self._call(self.ssh_command(["rm", "-rf", remote]), "removing the work directory")
        except ValidationError:
            pass  # the results are what matter; a stale /tmp directory on the board is harmless

    def _run_remote(self, remote: str, files: list[Path], args: list[str], out: str) -> RunResult:
        """Copy ``files`` in, run the target script with ``args`` writing to ``out``, copy its results back."""
        artifact = files[0].name
        self._call(self.scp_command([str(f) for f in files], f":{remote}/"), f"copying {artifact}")
        env = self.target_env()
        argv = [*shlex.split(self.remote_python), "-m", "edgelm.validate.target", artifact, *args, "--out", out]
        self._call(
            self.ssh_command(
                [
                    "sh",
                    "-c",
                    'cd "$0" && exec env ' + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + ' "$@"',
                    remote,
                    *argv,
                ]
            ),
            f"running {artifact}",
        )
        with tempfile.TemporaryDirectory(prefix="edgelm-ssh-back-") as back:
            self._call(self.scp_command([f":{remote}/{out}"], back), f"copying the results of {artifact} back")
            return read_target_output(Path(back) / Path(out).name)

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
        """Run one artifact (and its companion files beside it) on the board; ``checksums`` are checked
        there before loading. Raises ValidationError."""
        artifact, golden = Path(artifact), Path(golden)
        shared = [golden] + ([Path(eval_set)] if eval_set else [])
        remote = self._open(shared)
        try:
            files = BundleJob(artifact.parent, [artifact.name], golden).files(artifact.name)
            files += [Path(adapter)] if adapter is not None else []
            args = [
                "--golden",
                golden.name,
                *target_options(
                    threads,
                    warmup,
                    runs,
                    Path(adapter).name if adapter else None,
                    Path(eval_set).name if eval_set else None,
                ),
                *checksum_args(checksums),
            ]
            return self._run_remote(remote, files, args, "out")
        finally:
            self._close(remote)

    def run_bundle(self, job: BundleJob, on_result: OnResult) -> None:
        """One work directory for the whole bundle; each artifact's results come back before the next runs.
        Raises RunnerDropped when the board is lost (after one retry)."""
        shared = [job.golden] + ([job.eval_set] if job.eval_set else [])
        remote = self._open(shared)
        args = [
            "--golden",
            job.golden.name,
            *target_options(job.threads, job.warmup, job.runs, None, job.eval_set.name if job.eval_set else None),
        ]
        try:
            for i, name in enumerate(job.artifacts):
                deliver(
                    on_result,
                    name,
                    lambda name=name, i=i: self._run_remote(
                        remote, job.files(name), [*args, *job.checksum_options(name)], f"out-{i}"
                    ),
                )
        finally:
            self._close(remote)


#: The results JSON the Android demo app's instrumented test writes (examples/android) and the adb runner
#: reads: ``{"schema": DEVICE_RESULTS_SCHEMA, "device": {"model", "abi", "sdk", ...}, "artifacts": [{"artifact":
#: file name, "error": null or why, "format", "runtime": {name: version}, "threads", "warmup", "runs",
#: "latency_seq_len", "latency_samples_ms": [ms, ...], "load_ms", "peak_rss_mb", "outputs": [[float, ...], ...]
#: (one row per golden input), "eval_outputs": [[...], ...] or null}]}``.
DEVICE_RESULTS_SCHEMA = "edgelm-device-results/1"


def parse_device_results(data: dict, artifacts: list[str]) -> list[ArtifactRun]:
    """Turn the app's results JSON (:data:`DEVICE_RESULTS_SCHEMA`) into one :class:`ArtifactRun` per expected
    artifact (one the app did not report is an error). Raises ValidationError for another schema."""
    if not isinstance(data, dict) or data.get("schema") != DEVICE_RESULTS_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValidationError(
            f"the device's results JSON is not {DEVICE_RESULTS_SCHEMA} (got {got!r}): install "
            "the demo app built from this edgelm's examples/android"
        )
    device = data.get("device") or {}
    by_name = {a.get("artifact"): a for a in data.get("artifacts") or [] if isinstance(a, dict)}
    runs = []
    for name in artifacts:
        entry = by_name.get(name)
        if entry is None:
            runs.append(ArtifactRun(name, error=f"{name}: the app reported no result for it"))
            continue
        if entry.get("error"):
            runs.append(ArtifactRun(name, error=f"{name} failed on the phone: {entry['error']}"))
            continue
        try:
            outputs = np.asarray(entry["outputs"], dtype=np.float32)
            ev = entry.get("eval_outputs")
            result = {k: v for k, v in entry.items() if k not in ("outputs", "eval_outputs")}
            result["latency_samples_ms"] = [float(x) for x in entry["latency_samples_ms"]]
            result.setdefault("machine", device.get("abi", "android"))
            result["device"] = device
            runs.append(
                ArtifactRun(
                    name,
                    result=RunResult(
                        outputs=outputs, result=result, eval_outputs=None if ev is None else np.asarray(ev, np.float32)
                    ),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            runs.append(ArtifactRun(name, error=f"{name}: malformed entry in the device's results JSON: {exc}"))
    return runs


class AdbRunner(HostRunner):
    """Runs a bundle on an Android phone over adb: ``adb`` (the one attached device) or ``adb:SERIAL``.

    Pushes the bundle's Android app folder (``android/edgelm/`` from ``edgelm export --bundle android``: its
    manifest, vocabulary, labels, golden set and the artifacts to run) and the eval set into the demo app's
    external files directory (``/sdcard/Android/data/<app>/files/edgelm/<bundle>/``, readable by the app
    without a permission), runs the app's instrumented on-device accuracy check (``am instrument -w`` with the
    bundle, artifacts, threads, warm-up and runs as ``-e`` arguments), pulls the results JSON it writes
    (:data:`DEVICE_RESULTS_SCHEMA`) and reads it. The app is examples/android; build and install it first (its
    README says how).

    Args:
        target: ``adb`` or ``adb:SERIAL`` (a serial from ``adb devices``).
        adb: the adb executable (default: ``adb`` on PATH).
        app_id: the demo app's application id; its test package is ``<app_id>.test``.
    Raises:
        ValidationError: a malformed target, or adb not installed.
    """

    name = kind = "adb"
    APP_ID = "dev.edgelm.demo"
    TEST_RUNNER = "androidx.test.runner.AndroidJUnitRunner"
    RESULTS_FILE = "edgelm-results.json"

    def __init__(self, target: str = "adb", *, adb: str | None = None, app_id: str = APP_ID, timeout_s: float = 1800.0):
        super().__init__(timeout_s)
        m = re.fullmatch(r"adb(?::([A-Za-z0-9._:-]+))?", target)
        if not m:
            raise ValidationError(f"bad adb target {target!r}: use adb or adb:SERIAL (a serial from `adb devices`)")
        self.serial = m.group(1)
        self.adb = adb or shutil.which("adb")
        if not self.adb:
            raise ValidationError(
                "adb is not installed: `apt-get install adb` (Debian/Ubuntu) or the Android SDK "
                "platform-tools, then connect the phone with USB debugging on"
            )
        self.app_id = app_id
        self.name = f"adb:{self.serial}" if self.serial else "adb"

    def describe(self) -> dict:
        return {
            "runner": self.name,
            "kind": self.kind,
            "emulated": self.emulated,
            "serial": self.serial,
            "app": self.app_id,
        }

    def remote_dir(self, bundle: Path) -> str:
        """Where the bundle goes on the phone: the app's external files directory."""
        return f"/sdcard/Android/data/{self.app_id}/files/edgelm/{Path(bundle).resolve().name}"

    def adb_command(self, *args: str, serial: str | None = None) -> list[str]:
        """``adb [-s SERIAL] args...``."""
        serial = serial or self.serial
        return [self.adb, *(["-s", serial] if serial else []), *args]

    def devices(self) -> list[tuple[str, str]]:
        """``(serial, state)`` of every device ``adb devices`` lists (state: device, unauthorized, offline...).
        Raises ValidationError when adb itself fails."""
        try:
            proc = subprocess.run([self.adb, "devices"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise ValidationError("`adb devices` did not answer within 60 s: run `adb kill-server` and retry") from None
        if proc.returncode != 0:
            raise ValidationError(f"`adb devices` failed: {proc.stderr.strip() or proc.returncode}")
        found = []
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.startswith(("List of devices", "*")):
                found.append((parts[0], parts[1]))
        return found

    def select_device(self) -> str:
        """The serial to use. Raises ValidationError with what to do when there is no usable device."""
        found = self.devices()
        ready = [s for s, state in found if state == "device"]
        if self.serial:
            state = dict(found).get(self.serial)
            if state is None:
                listed = ", ".join(f"{s} ({st})" for s, st in found) or "none"
                raise ValidationError(
                    f"no Android device {self.serial} attached (adb devices lists: {listed}); "
                    "check the cable or `adb connect HOST:PORT`"
                )
            if state != "device":
                raise ValidationError(
                    f"Android device {self.serial} is {state}: "
                    + (
                        "accept the USB debugging prompt on the phone"
                        if state == "unauthorized"
                        else "reconnect it (adb reconnect) and retry"
                    )
                )
            return self.serial
        if not ready:
            if found:
                states = ", ".join(f"{s} ({st})" for s, st in found)
                raise ValidationError(
                    f"no usable Android device: adb devices lists {states}; accept the USB "
                    "debugging prompt on the phone or reconnect it"
                )
            raise ValidationError(
                "no Android device: `adb devices` lists none. Connect a phone with USB debugging "
                "on (Settings > Developer options) or start an Android emulator, then retry"
            )
        if len(ready) > 1:
            raise ValidationError(
                f"{len(ready)} Android devices attached ({', '.join(ready)}): pick one with --runner adb:{ready[0]}"
            )
        return ready[0]

    @staticmethod
    def app_bundle(bundle: Path) -> Path:
        """The bundle's Android app folder (``<bundle>/android/edgelm``, from ``edgelm export --bundle android``):
        the app reads its manifest. Raises ValidationError when the bundle has none."""
        app = android_assets(bundle)
        if not (app / "manifest.json").is_file():
            raise ValidationError(
                f"{bundle} has no Android app bundle: export it with `edgelm export --device ... "
                "--bundle android` (the demo app reads android/edgelm/manifest.json)"
            )
        return app

    def push_commands(self, job: BundleJob, serial: str) -> list[list[str]]:
        """adb commands that clear the phone's bundle directory and push the app bundle (manifest, vocabulary,
        labels, golden set, the job's artifacts with their companions) and the eval set into it."""
        remote = self.remote_dir(job.bundle)
        app = self.app_bundle(job.bundle)
        app_job = BundleJob(app, job.artifacts, app / job.golden.name)
        files = [app / "manifest.json", app / "vocab.txt", app / job.golden.name]
        files += [app / "labels.json"] if (app / "labels.json").is_file() else []
        files += [job.eval_set] if job.eval_set else []
        files += [f for name in job.artifacts for f in app_job.files(name)]
        return [
            self.adb_command("shell", shlex.join(["rm", "-rf", remote]), serial=serial),
            self.adb_command("shell", shlex.join(["mkdir", "-p", remote]), serial=serial),
            self.adb_command("push", *[str(f) for f in files], remote + "/", serial=serial),
        ]

    def instrument_command(self, job: BundleJob, serial: str) -> list[str]:
        """``adb shell am instrument -w -e ... <app>.test/<runner>``: the app's on-device accuracy check."""
        remote = self.remote_dir(job.bundle)
        extras = {
            "bundle": remote,
            "artifacts": ",".join(job.artifacts),
            "golden": job.golden.name,
            "warmup": str(job.warmup),
            "runs": str(job.runs),
            "results": f"{remote}/{self.RESULTS_FILE}",
        }
        if job.threads:
            extras["threads"] = str(job.threads)
        if job.eval_set is not None:
            extras["eval"] = job.eval_set.name
        argv = ["am", "instrument", "-w"]
        for k, v in extras.items():
            argv += ["-e", k, v]
        argv.append(f"{self.app_id}.test/{self.TEST_RUNNER}")
        return self.adb_command("shell", shlex.join(argv), serial=serial)

    def pull_command(self, job: BundleJob, serial: str, local: Path) -> list[str]:
        """``adb pull`` of the results JSON into ``local``."""
        return self.adb_command("pull", f"{self.remote_dir(job.bundle)}/{self.RESULTS_FILE}", str(local), serial=serial)

    def _adb_call(self, argv: list[str], what: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise RunnerDropped(f"{what} on {self.name}: no answer within {self.timeout_s:.0f} s") from None
        text = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or "INSTRUMENTATION_FAILED" in text or "Error:" in text:
            last = text.splitlines()[-1] if text else f"exit code {proc.returncode}"
            if "device" in last and ("not found" in last or "offline" in last):
                raise RunnerDropped(f"{what} on {self.name}: the phone was lost ({last})")
            raise ValidationError(f"{what} on {self.name} failed: {last}")
        return text

    def run_bundle(self, job: BundleJob, on_result: OnResult) -> None:
        """Push, run the instrumented check once for all artifacts, pull and read its results JSON.
        Raises ValidationError (no app bundle, no device, app not installed, check failed) or RunnerDropped."""
        self.app_bundle(job.bundle)
        serial = self.select_device()
        for argv in self.push_commands(job, serial):
            self._adb_call(argv, "pushing the bundle")
        out = self._adb_call(self.instrument_command(job, serial), "the on-device accuracy check")
        if "Unable to find instrumentation" in out:
            raise ValidationError(
                f"the edgelm demo app ({self.app_id}) and its test APK are not installed on "
                f"{serial}: build and install them from examples/android"
            )
        with tempfile.TemporaryDirectory(prefix="edgelm-adb-") as tmp:
            local = Path(tmp) / self.RESULTS_FILE
            self._adb_call(self.pull_command(job, serial, local), "pulling the results")
            try:
                data = json.loads(local.read_text())
            except (OSError, ValueError) as exc:
                raise ValidationError(f"the results JSON pulled from {serial} is unreadable: {exc}") from None
        for run in parse_device_results(data, job.artifacts):
            on_result(run)

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
        """Run one artifact through the app, which checks every sha256 of its bundle before it runs
        (swapped adapters are not supported on the phone yet)."""
        if adapter is not None:
            raise ValidationError("the adb runner does not swap adapters yet: validate each adapter's bundle")
        got: list[ArtifactRun] = []
        artifact = Path(artifact)
        self.run_bundle(
            BundleJob(
                artifact.parent, [artifact.name], Path(golden), eval_set and Path(eval_set), threads, warmup, runs
            ),
            got.append,
        )
        if got[0].error:
            raise ValidationError(got[0].error)
        return got[0].result


RUNNER_SPECS = "host, emulator, ssh://user@host[:port], adb or adb:SERIAL"


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


def make_runner(
    spec: str,
    *,
    emulator_cpu: str | None = None,
    sysroot: Path | None = None,
    key_file: Path | None = None,
    known_hosts: Path | None = None,
    remote_python: str = "python3",
    remote_env: dict[str, str] | None = None,
) -> HostRunner:
    """The runner for ``spec`` (:data:`RUNNER_SPECS`). ``emulator_cpu``/``sysroot`` configure ``emulator``;
    ``key_file``/``known_hosts``/``remote_python``/``remote_env`` configure ``ssh://``.
    Raises ValidationError (unknown spec, bad target, missing files) or EmulatorError (no qemu or sysroot)."""
    spec = (spec or "").strip()
    if spec == "host":
        return HostRunner()
    if spec == "emulator":
        return EmulatorRunner(sysroot, emulator_cpu)
    if spec.startswith("ssh://"):
        return SSHRunner(
            spec, key_file=key_file, known_hosts=known_hosts, remote_python=remote_python, remote_env=remote_env
        )
    if spec == "adb" or spec.startswith("adb:"):
        return AdbRunner(spec)
    raise ValidationError(f"unknown runner {spec!r}: use one of {RUNNER_SPECS}")
