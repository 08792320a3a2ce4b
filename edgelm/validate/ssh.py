"""The SSH runner: artifacts on a board (``ssh://user@host[:port]``) through ``ssh``/``scp`` with a pinned
host key, running the torch-free target script there."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import edgelm
from edgelm import TELEMETRY_OFF
from edgelm.errors import ValidationError
from edgelm.validate.host import HostRunner
from edgelm.validate.runner import (
    BundleJob,
    OnResult,
    RunnerDropped,
    RunResult,
    checksum_args,
    deliver,
    failure_line,
    read_target_output,
    target_options,
)

#: What the target side needs on a board: the torch-free target script and the exporters' sessions.
PAYLOAD_FILES = (
    "edgelm/__init__.py",
    "edgelm/validate/__init__.py",
    "edgelm/validate/target.py",
    "edgelm/generation.py",  # decoders' greedy tokens, perplexity and speed (numpy only)
)
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

    def skip_reason(self, artifact: Path) -> str | None:
        """None: whether a ``.pte`` runs is the board's business, not this machine's packages."""
        return None

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
