"""Runners: execute the target script (:mod:`edgelm.validate.target`) for an artifact somewhere and bring
back its outputs and timings: ``host`` (this machine) and ``emulator`` (arm64 under qemu, see
:mod:`edgelm.validate.emulator`). Each artifact runs in its own fresh process, so its peak RSS is its own.
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
    and every remote argument is shell-quoted. Per artifact: a temporary directory on the board
    (``mktemp -d``), the target payload (:func:`target_payload`), the artifact with its companion files and
    the golden set copied in, ``python -m edgelm.validate.target`` run there, its ``outputs.npy`` and
    ``result.json`` copied back, and the directory removed. A dropped connection or a timeout (ssh exit 255,
    or no answer within ``timeout_s``) is retried once, then raises ValidationError.

    Args:
        target: ``ssh://user@host[:port]`` (port 22 by default).
        key_file: the private key to log in with.
        known_hosts: the pinned known_hosts file holding the board's host key.
        remote_python: the command that starts Python on the board (split with shlex), e.g. ``python3``, or
            ``qemu-aarch64-static -L /sysroot/root /sysroot/root/usr/bin/python3.11`` for an emulated board.
        remote_env: environment variables set for the target script on the board.
    """

    name = "ssh"

    def __init__(self, target: str, *, key_file: Path, known_hosts: Path, remote_python: str = "python3",
                 remote_env: dict[str, str] | None = None, timeout_s: float = 600.0, connect_timeout_s: int = 10):
        super().__init__(timeout_s)
        m = re.fullmatch(r"ssh://([A-Za-z0-9._-]+)@([A-Za-z0-9.:_-]+?)(?::(\d+))?", target)
        if not m:
            raise ValidationError(f"bad SSH target {target!r}: use ssh://user@host[:port]")
        self.user, self.host, self.port = m.group(1), m.group(2), int(m.group(3) or 22)
        for what, p in (("key file", key_file), ("known_hosts file", known_hosts)):
            if not Path(p).is_file():
                raise ValidationError(f"SSH {what} not found: {p}")
        self.key_file, self.known_hosts = Path(key_file), Path(known_hosts)
        self.remote_python, self.remote_env = remote_python, dict(remote_env or {})
        self.connect_timeout_s = connect_timeout_s
        self.name = f"ssh://{self.user}@{self.host}:{self.port}"

    def _options(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout_s}",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", "-i", str(self.key_file)]

    def ssh_command(self, remote: list[str]) -> list[str]:
        """The local argv that runs ``remote`` (argv, each element quoted) on the board."""
        return ["ssh", *self._options(), "-p", str(self.port), f"{self.user}@{self.host}",
                " ".join(shlex.quote(a) for a in remote)]

    def scp_command(self, sources: list[str], dest: str) -> list[str]:
        """The local argv that copies ``sources`` to ``dest`` (a remote path is written ``:path``)."""
        def where(p: str) -> str:
            return f"{self.user}@{self.host}:{shlex.quote(p[1:])}" if p.startswith(":") else p

        return ["scp", "-q", "-r", *self._options(), "-P", str(self.port), *[where(s) for s in sources], where(dest)]

    def _call(self, argv: list[str], what: str) -> str:
        """Run ``argv``; retry once on a dropped connection (exit 255) or a timeout. Raises ValidationError."""
        last = ""
        for _ in range(2):
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                last = f"no answer within {self.timeout_s:.0f} s"
                continue
            if proc.returncode == 0:
                return proc.stdout
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            if proc.returncode != 255:  # the remote command failed: retrying would not help
                raise ValidationError(f"{what} on {self.name} failed: {last}")
        raise ValidationError(f"{what} on {self.name} failed twice (connection dropped or timed out): {last}. "
                              "Check that the board is reachable and its host key is in the known_hosts file")

    def run_artifact(self, artifact: Path, golden: Path, *, threads: int | None, warmup: int = 5,
                     runs: int = 20, adapter: Path | None = None) -> RunResult:
        """Run one artifact (and its companion files beside it) on the board. Raises ValidationError."""
        artifact, golden = Path(artifact), Path(golden)
        remote = self._call(self.ssh_command(["mktemp", "-d", "/tmp/edgelm-run-XXXXXX"]), "creating a work "
                            "directory").strip()
        try:
            with tempfile.TemporaryDirectory(prefix="edgelm-ssh-") as tmp:
                stage = target_payload(Path(tmp) / "payload")
                for f in [artifact, golden, *sorted(artifact.parent.glob(f"{artifact.stem}.*adapter*"))]:
                    shutil.copy2(f, stage / f.name)
                if adapter is not None:
                    shutil.copy2(adapter, stage / Path(adapter).name)
                self._call(self.scp_command([str(p) for p in sorted(stage.iterdir())], f":{remote}/"),
                           "copying the artifact")
                args = [*shlex.split(self.remote_python), "-m", "edgelm.validate.target", artifact.name,
                        "--golden", golden.name, "--out", "out", "--warmup", str(warmup), "--runs", str(runs)]
                if threads:
                    args += ["--threads", str(threads)]
                if adapter is not None:
                    args += ["--adapter", Path(adapter).name]
                env = {"PYTHONPATH": ".", **self.remote_env}
                self._call(self.ssh_command(["sh", "-c", "cd \"$0\" && exec env " + " ".join(
                    shlex.quote(f"{k}={v}") for k, v in env.items()) + " \"$@\"", remote, *args]),
                    f"running {artifact.name}")
                back = Path(tmp) / "back"
                back.mkdir()
                self._call(self.scp_command([f":{remote}/out/outputs.npy", f":{remote}/out/result.json"], str(back)),
                           "copying the results back")
                outputs = np.load(back / "outputs.npy")
                result = json.loads((back / "result.json").read_text())
        finally:
            try:
                self._call(self.ssh_command(["rm", "-rf", remote]), "removing the work directory")
            except ValidationError:
                pass  # the results are what matter; a stale /tmp directory on the board is harmless
        return RunResult(outputs=outputs, result=result)
