"""The SSH runner against a real sshd the test starts on 127.0.0.1 (Debian openssh-server, throwaway keys,
``sshd -D`` so its pid is known and it is stopped at the end): as an x86 board, and as an arm64 board whose
Python runs under the emulator."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import arm64_board_runner, free_port

from edgelm.errors import ValidationError
from edgelm.validate.runners import HostRunner, SSHRunner


def test_ssh_runner_runs_on_the_loopback_board(board, runner_artifacts):
    target, key, known, _ = board
    golden, arts = runner_artifacts
    path = arts["onnx"]
    host = HostRunner().run_artifact(path, golden, threads=1, warmup=0, runs=2)
    remote = SSHRunner(target, key_file=key, known_hosts=known).run_artifact(path, golden, threads=1, warmup=0, runs=2)
    assert np.abs(remote.outputs - host.outputs).max() < 1e-6
    assert remote.result["artifact"] == "model with space.onnx" and remote.result["runs"] == 2
    assert remote.result["torch_imported"] is False


def test_ssh_runner_refuses_unknown_host_key_and_bad_targets(board, runner_artifacts, tmp_path):
    target, key, known, port = board
    golden, arts = runner_artifacts
    path = arts["onnx"]
    wrong = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    wrong.write_text(f"[127.0.0.1]:{port} {other[0]} {other[1]}\n")
    with pytest.raises(ValidationError, match="failed twice"):
        SSHRunner(target, key_file=key, known_hosts=wrong).run_artifact(path, golden, threads=1, warmup=0, runs=1)
    with pytest.raises(ValidationError, match="use ssh://user@host"):
        SSHRunner("ssh://nohost", key_file=key, known_hosts=known)
    with pytest.raises(ValidationError, match="key file not found"):
        SSHRunner(target, key_file=tmp_path / "nokey", known_hosts=known)
    dead = f"ssh://u@127.0.0.1:{free_port()}"
    with pytest.raises(ValidationError, match="connection dropped or timed out"):
        SSHRunner(dead, key_file=key, known_hosts=known).run_artifact(path, golden, threads=1)


def test_ssh_command_quotes_every_remote_argument(board):
    target, key, known, _port = board
    r = SSHRunner(target, key_file=key, known_hosts=known)
    argv = r.ssh_command(["ls", "a b", "$(reboot)", "x;y"])
    assert argv[:2] == ["ssh", "-o"] and "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
    assert argv[-1] == "ls 'a b' '$(reboot)' 'x;y'"
    assert r.scp_command(["/tmp/f"], ":/remote dir/")[-1].endswith(":'/remote dir/'")


def test_ssh_board_running_arm64_python_under_the_emulator(board, runner_artifacts, sysroot):
    """The 'board' runs the target script as an arm64 program through qemu and the emulator sysroot."""
    golden, arts = runner_artifacts
    path = arts["onnx"]
    remote = arm64_board_runner(board, sysroot).run_artifact(path, golden, threads=1, warmup=0, runs=1)
    host = HostRunner().run_artifact(path, golden, threads=1, warmup=0, runs=1)
    assert remote.result["machine"] == "aarch64"
    assert np.abs(remote.outputs - host.outputs).max() < 1e-3
