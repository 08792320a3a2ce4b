"""Shared fixtures: tiny random-config BERT/RoBERTa checkpoints with a real WordPiece tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgelm.testing import make_checkpoint

# pytest-xdist gives its workers COLUMNS=80 and LINES=24; rich fixes a console's size from them when the
# console is created (edgelm.cli's at import), which would override the width each CLI test asks for
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-cls"), kind="classifier", seed=1)


@pytest.fixture(scope="session")
def tiny_roberta_classifier(tmp_path_factory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("tiny-roberta"), kind="classifier", model_type="roberta", num_labels=3, seed=2
    )


@pytest.fixture
def labeled_tsv(tmp_path) -> Path:
    """A small labeled TSV in SST-2's layout (sentence, label) made from the probe sentences."""
    from edgelm.data import PROBE_SENTENCES

    path = tmp_path / "eval.tsv"
    rows = ["sentence\tlabel"] + [f"{s}\t{i % 2}" for i, s in enumerate(PROBE_SENTENCES[:40])]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def memo_tsv(tmp_path_factory) -> Path:
    """All 74 probe sentences with alternating labels: a task a tiny model can only memorise."""
    from edgelm.data import PROBE_SENTENCES

    path = tmp_path_factory.mktemp("memo") / "memo.tsv"
    path.write_text("\n".join(["sentence\tlabel"] + [f"{s}\t{i % 2}" for i, s in enumerate(PROBE_SENTENCES)]) + "\n")
    return path


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, memo_tsv) -> Path:
    """A tiny BERT (2 heads of 32) fine-tuned by edgelm on ``memo_tsv`` until it fits it."""
    from edgelm.compress.jobs import run_finetune
    from edgelm.compress.train import TrainConfig

    base = make_checkpoint(tmp_path_factory.mktemp("enc"), heads=2, seed=3)
    out = tmp_path_factory.mktemp("trained") / "ft"
    run_finetune(base, memo_tsv, out, eval_data=memo_tsv, cfg=TrainConfig(epochs=8, lr=3e-3, batch_size=8, seq_len=32))
    return out


@pytest.fixture(scope="session")
def sysroot(tmp_path_factory):
    """The arm64 emulator sysroot, built once per session (needs qemu-user-static, apt-get and the network
    to the Debian mirror and PyPI; about 15 s)."""
    import shutil

    if shutil.which("qemu-aarch64-static") is None or shutil.which("apt-get") is None:
        pytest.skip("qemu-user-static (and apt-get) not installed: apt-get install qemu-user-static")
    from edgelm.validate import emulator

    return emulator.setup(tmp_path_factory.mktemp("emu") / "sysroot")


@pytest.fixture(scope="session")
def runner_artifacts(tmp_path_factory, tiny_classifier):
    """A golden set (6 rows, one padded) and the tiny classifier exported int8 to every format, for the
    runner tests: ``(golden.npz, {format: artifact path})``; the ONNX file name has a space in it."""
    import numpy as np
    import torch

    import exporters
    from edgelm.models import load_model
    from exporters.base import QuantSpec

    d = tmp_path_factory.mktemp("runner-art")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 150, (6, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 10:] = 0
    ids[2, 10:] = 0
    np.savez(
        d / "golden.npz", input_ids=ids, attention_mask=mask, latency_input_ids=ids[:1], latency_attention_mask=mask[:1]
    )
    module = load_model(tiny_classifier).module
    ex = {"input_ids": torch.ones(1, 32, dtype=torch.int64), "attention_mask": torch.ones(1, 32, dtype=torch.int64)}
    names = {"onnx": "model with space.onnx", "tflite": "m.tflite", "executorch": "m.pte"}
    arts = {
        fmt: exporters.get(fmt)
        .export(module, ex, QuantSpec("int8_dynamic", embedding_bits=8), d / name, exporters.ExportOptions("logits"))
        .path
        for fmt, name in names.items()
    }
    return d / "golden.npz", arts


def start_sshd(d: Path):
    """Start a loopback sshd (Debian openssh-server) in ``d`` with throwaway ed25519 keys on a free port, in the
    foreground (``sshd -D``, so its pid is known). Returns ``(target, key_file, known_hosts, port, process)``;
    the caller stops the process. Skips when openssh-server / openssh-client are not installed."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None or shutil.which("ssh") is None:
        pytest.skip("openssh-server / openssh-client not installed: apt-get install openssh-server")
    os.chmod(d, 0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {d / 'host_key'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                f"PidFile {d / 'sshd.pid'}",
                "LogLevel ERROR",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    host_key = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    return f"ssh://{user}@127.0.0.1:{port}", d / "user_key", d / "known_hosts", port, proc


def arm64_board_runner(board, sysroot: Path):
    """An SSHRunner for the loopback ``board`` whose Python runs as an arm64 program: qemu over the emulator
    ``sysroot`` (its aarch64 python3.11 and wheels), the CPU model cortex-a76."""
    from edgelm.validate import emulator
    from edgelm.validate.ssh import SSHRunner

    target, key, known, _ = board
    root = sysroot / "root"
    return SSHRunner(
        target,
        key_file=key,
        known_hosts=known,
        remote_python=f"{emulator.qemu_binary()} -L {root} {root / 'usr/bin/python3.11'}",
        remote_env={"PYTHONPATH": f".:{sysroot / 'site'}", "QEMU_CPU": "cortex-a76"},
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def board(tmp_path_factory):
    """A loopback 'board' for the whole session: ``(target, key_file, known_hosts, port)``."""
    target, key, known, port, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield target, key, known, port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def pixel8_bundle(tmp_path_factory, tiny_classifier, memo_tsv) -> Path:
    """``edgelm export --device pixel8 --bundle android`` of the tiny classifier (ExecuTorch, TFLite, ONNX, int8)
    with a labeled golden set of 24 probe sentences: ``dist/pixel8`` (read-only: copy it to change it)."""
    from typer.testing import CliRunner

    from edgelm.cli import app

    out = tmp_path_factory.mktemp("bundle")
    r = CliRunner().invoke(
        app,
        [
            "export",
            "--device",
            "pixel8",
            "--model",
            str(tiny_classifier),
            "--data",
            str(memo_tsv),
            "--limit",
            "24",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--bundle",
            "android",
        ],
    )
    assert r.exit_code == 0, r.output
    return out / "pixel8"
