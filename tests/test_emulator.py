"""The arm64 emulator runner: a real qemu over a real Debian arm64 sysroot, running real artifacts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.errors import ValidationError
from edgelm.profiles import load_profile
from edgelm.validate import emulator
from edgelm.validate.runners import EmulatorRunner, HostRunner

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("apt-get") is None,
    reason="qemu-user-static (and apt-get) not installed: apt-get install qemu-user-static",
)


def test_qemu_cpu_follows_the_profile():
    assert emulator.qemu_cpu_for(load_profile("raspberry-pi-5").hardware.cpu) == (
        "cortex-a76",
        "the profile's cortex-a76",
    )
    assert emulator.qemu_cpu_for(load_profile("raspberry-pi-zero-2w").hardware.cpu)[0] == "cortex-a53"
    cpu, why = emulator.qemu_cpu_for(load_profile("pixel8").hardware.cpu)
    assert cpu == "cortex-a76" and "no cortex-x3 model" in why
    assert emulator.FALLBACK_CPU in emulator.QEMU_CPUS and "max" not in emulator.QEMU_CPUS


@needs_qemu
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_emulated_arm64_run_matches_the_host(sysroot, runner_artifacts, fmt):
    golden, arts = runner_artifacts
    host = HostRunner().run_artifact(arts[fmt], golden, threads=1, warmup=0, runs=2)
    emu = EmulatorRunner(sysroot, cpu="cortex-a76").run_artifact(arts[fmt], golden, threads=1, warmup=0, runs=2)
    assert emu.result["machine"] == "aarch64" and host.result["machine"] == "x86_64"
    assert emu.result["torch_imported"] is False  # the target side is numpy + the runtime only
    assert emu.outputs.shape == host.outputs.shape == (6, 2)
    assert np.abs(emu.outputs - host.outputs).max() < 1e-3
    assert (emu.outputs.argmax(1) == host.outputs.argmax(1)).all()


@needs_qemu
def test_emulator_refuses_pte_without_executorch_and_missing_sysroot(sysroot, runner_artifacts, tmp_path):
    golden, arts = runner_artifacts
    with pytest.raises(ValidationError, match="emulator setup --executorch"):
        EmulatorRunner(sysroot).run_artifact(arts["executorch"], golden, threads=1)
    with pytest.raises(emulator.EmulatorError, match="edgelm emulator setup"):
        EmulatorRunner(tmp_path / "none")
    with pytest.raises(emulator.EmulatorError, match="not one of"):
        EmulatorRunner(sysroot, cpu="max")


@needs_qemu
def test_emulator_setup_cli_reuses_the_sysroot(sysroot):
    r = CliRunner().invoke(app, ["emulator", "setup", "--sysroot", str(sysroot)])
    assert r.exit_code == 0, r.output
    assert str(sysroot) in r.output.replace("\n", "")
    assert emulator.sysroot_info(sysroot)["check"].startswith("aarch64")


def test_aarch64_wheels_install_with_an_unreachable_torch_index(tmp_path):
    """The pip step of ``emulator setup``: aarch64 wheels land in the target; the extra index for torch's CPU build
    (PyTorch's, unreachable here) is tried and passed over, not fatal."""
    import subprocess

    cmd = emulator.pip_command(tmp_path / "site", ("numpy==2.2.6",), extra_index="http://127.0.0.1:9/whl/cpu")
    assert cmd[cmd.index("--extra-index-url") + 1] == "http://127.0.0.1:9/whl/cpu"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    libs = list((tmp_path / "site" / "numpy").rglob("_multiarray_umath*.so"))
    assert libs and "aarch64" in libs[0].name
