"""Runners by name: :func:`make_runner` turns a ``--runner`` spec into a runner, and this module gathers
the runner classes and shared types (:mod:`edgelm.validate.runner`) for callers that want them in one place.
"""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ValidationError
from edgelm.validate.adb import DEVICE_RESULTS_SCHEMA, AdbRunner, parse_device_results
from edgelm.validate.emulator import EmulatorRunner
from edgelm.validate.host import HostRunner
from edgelm.validate.runner import (
    ArtifactRun,
    BundleJob,
    OnResult,
    Runner,
    RunnerDropped,
    RunResult,
    check_timing,
    checksum_args,
    deliver,
    failure_line,
    parse_env,
    read_target_output,
    target_options,
)
from edgelm.validate.ssh import PAYLOAD_FILES, PAYLOAD_PACKAGES, SSHRunner, target_payload

__all__ = [
    "DEVICE_RESULTS_SCHEMA",
    "PAYLOAD_FILES",
    "PAYLOAD_PACKAGES",
    "RUNNER_SPECS",
    "AdbRunner",
    "ArtifactRun",
    "BundleJob",
    "EmulatorRunner",
    "HostRunner",
    "OnResult",
    "RunResult",
    "Runner",
    "RunnerDropped",
    "SSHRunner",
    "check_timing",
    "checksum_args",
    "deliver",
    "failure_line",
    "make_runner",
    "parse_device_results",
    "parse_env",
    "read_target_output",
    "target_options",
    "target_payload",
]


RUNNER_SPECS = "host, emulator, ssh://user@host[:port], adb or adb:SERIAL"


def make_runner(
    spec: str,
    *,
    emulator_cpu: str | None = None,
    sysroot: Path | None = None,
    key_file: Path | None = None,
    known_hosts: Path | None = None,
    remote_python: str = "python3",
    remote_env: dict[str, str] | None = None,
) -> Runner:
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
