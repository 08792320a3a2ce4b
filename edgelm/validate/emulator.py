"""The arm64 emulator: qemu user-mode emulation over a sysroot edgelm builds without root.

``edgelm emulator setup`` builds the sysroot once and caches it (default ``~/.cache/edgelm/emulator/``, or
``$EDGELM_CACHE/emulator/``):

1. Debian bookworm **arm64** packages for ``python3.11`` and the C/C++ runtime libraries, resolved and fetched
   with ``apt-get`` under a private configuration (its own sources list, state and cache directories, so the
   host's dpkg architectures are never touched) and unpacked with ``dpkg-deb -x``;
2. aarch64 wheels of numpy, onnxruntime and ai-edge-litert, installed from the host with
   ``pip install --target SITE --only-binary=:all: --platform manylinux_2_28_aarch64 --platform
   manylinux_2_27_aarch64 ...``; with ``executorch=True`` also torch (its CPU build, from PyTorch's index beside
   PyPI: :data:`TORCH_CPU_INDEX`) and executorch (opt-in);
3. an ARM ``/proc/cpuinfo`` inside the sysroot: qemu resolves paths inside ``-L SYSROOT`` first, and ONNX
   Runtime's cpuinfo segfaults on import when it reads the host's x86 one.

Programs run as ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3.11 ...`` with ``QEMU_CPU`` set to a
model qemu has (:func:`qemu_cpu_for`): qemu 7.2's default ``max`` model gave wrong int8 results from ONNX
Runtime here (max error 0.13 against 2e-7 with ``cortex-a76``). Emulated latency is functional only, never
device speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from edgelm.errors import EdgeLMError
from edgelm.fsutil import write_directory
from edgelm.validate.host import HostRunner
from exporters.cascade import inner_name

#: CPU models qemu 7.2's aarch64 user-mode emulator has (``qemu-aarch64-static -cpu help``), minus ``max``.
QEMU_CPUS = ("cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1", "a64fx")
#: Used when the profile's big core is not one of :data:`QEMU_CPUS`: an Armv8.2 core with dot-product.
FALLBACK_CPU = "cortex-a76"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: arm64 packages of the sysroot (apt resolves their dependencies).
PACKAGES = ("python3.11", "libstdc++6", "libgomp1")
#: aarch64 wheels every sysroot gets, and the opt-in ones for .pte artifacts.
WHEELS = ("numpy", "onnxruntime", "ai-edge-litert")
EXECUTORCH_WHEELS = ("torch==2.13.0", "executorch==1.5.1")
#: Where the opt-in torch comes from (an extra index beside PyPI): since torch 2.9 PyPI's aarch64 Linux wheel is
#: the CUDA build, which needs about 3 GB of nvidia-* wheels (and the registry here lacks one of them,
#: nvidia-nccl-cu13 2.29.7 for aarch64); the CPU build (``2.13.0+cpu``, which pip prefers) is on PyTorch's index.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MARKER = "edgelm-sysroot.json"
ARM_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: "
    "0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    for i in range(4)
)


class EmulatorError(EdgeLMError):
    """The emulator is missing, its setup failed, or it cannot run an artifact."""

    exit_code = 2


def cache_root() -> Path:
    """Where edgelm caches what it builds: ``$EDGELM_CACHE``, else ``$XDG_CACHE_HOME/edgelm``, else
    ``~/.cache/edgelm``."""
    if os.environ.get("EDGELM_CACHE"):
        return Path(os.environ["EDGELM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgelm"


def default_sysroot() -> Path:
    return cache_root() / "emulator" / f"debian-{DEBIAN_SUITE}-arm64-py311"


def qemu_binary() -> str:
    """Path of ``qemu-aarch64-static``. Raises EmulatorError saying how to install it."""
    path = shutil.which("qemu-aarch64-static")
    if not path:
        raise EmulatorError(
            "qemu-aarch64-static is not installed: run `apt-get install qemu-user-static` "
            "(Debian/Ubuntu), then `edgelm emulator setup`"
        )
    return path


def qemu_cpu_for(cpu_description: str) -> tuple[str, str]:
    """``(qemu CPU model, why)`` for a profile's ``hardware.cpu`` text: its first (big) core when qemu has
    that model (``Cortex-A76`` -> ``cortex-a76``), else :data:`FALLBACK_CPU`."""
    cores = re.findall(r"(cortex-[a-z]\d+[a-z]*|neoverse-[a-z]\d+)", cpu_description.lower())
    if cores and cores[0] in QEMU_CPUS:
        return cores[0], f"the profile's {cores[0]}"
    named = cores[0] if cores else "core"
    return FALLBACK_CPU, f"qemu has no {named} model; {FALLBACK_CPU} (Armv8.2 with dot-product) stands in"


def _run(cmd: list[str], what: str, env: dict | None = None, timeout: float = 1800, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise EmulatorError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def _apt_config(work: Path) -> Path:
    """A private apt configuration for arm64 packages under ``work`` (the host's apt state is not touched)."""
    for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "etc" / "sources.list").write_text(f"deb [arch=arm64] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    (work / "status").touch()
    conf = work / "apt.conf"
    conf.write_text(
        "\n".join(
            [
                'APT::Architecture "arm64";',
                'APT::Architectures { "arm64"; };',
                'APT::Install-Recommends "false";',
                f'Dir::State "{work}";',
                f'Dir::State::status "{work}/status";',
                f'Dir::Cache "{work}/cache";',
                f'Dir::Etc::sourcelist "{work}/etc/sources.list";',
                f'Dir::Etc::sourceparts "{work}/etc/sources.list.d";',
                f'Dir::Etc::preferencesparts "{work}/etc/preferences.d";',
                'Dir::Etc::Trusted "/etc/apt/trusted.gpg";',
                'Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d";',
                "",
            ]
        )
    )
    return conf


def setup(
    dest: str | os.PathLike | None = None,
    *,
    executorch: bool = False,
    torch_index: str | None = TORCH_CPU_INDEX,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Build the arm64 sysroot into ``dest`` (default :func:`default_sysroot`) and return it; an existing,
    complete sysroot with the same wheel set is reused unless ``force``. Built in a temp dir beside
    ``dest`` and renamed at the end (:func:`edgelm.fsutil.write_directory`). Needs ``apt-get``,
    ``dpkg-deb`` and ``qemu-aarch64-static``, and network access to the Debian mirror and PyPI; with
    ``executorch``, also to ``torch_index`` (an extra index for torch's CPU build, :data:`TORCH_CPU_INDEX`;
    None: PyPI alone, whose aarch64 torch is the CUDA build).

    Raises:
        EmulatorError: a tool missing, a download or unpack failure, or the finished sysroot failing to
            import onnxruntime under emulation.
    """
    qemu = qemu_binary()
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise EmulatorError(f"{tool} is not installed: the sysroot is built from Debian packages")
    dest = Path(dest) if dest else default_sysroot()
    wheels = WHEELS + (EXECUTORCH_WHEELS if executorch else ())
    marker = dest / MARKER
    if marker.is_file() and not force and set(json.loads(marker.read_text()).get("wheels", [])) >= set(wheels):
        return dest
    total = 6
    step = 0

    def tick(desc: str) -> None:
        nonlocal step
        if progress:
            progress(desc, step, total)
        step += 1

    def build(tmp: Path) -> None:
        tick("resolving arm64 Debian packages")
        env = {**os.environ, "APT_CONFIG": str(_apt_config(tmp / "apt")), "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], "apt-get update (arm64)", env)
        sim = _run(["apt-get", "-s", "install", *PACKAGES], "resolving arm64 packages", env)
        pkgs = [ln.split()[1] for ln in sim.splitlines() if ln.startswith("Inst ")]
        tick(f"downloading {len(pkgs)} arm64 packages")
        debs = tmp / "debs"
        debs.mkdir()
        _run(["apt-get", "download", *pkgs], "downloading arm64 packages", env, cwd=debs)
        tick("unpacking packages")
        root = tmp / "root"
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc" / "cpuinfo").write_text(ARM_CPUINFO)
        tick(f"installing aarch64 wheels ({', '.join(wheels)})")
        try:
            _run(
                pip_command(tmp / "site", wheels, torch_index if executorch else None),
                "pip install of the aarch64 wheels",
            )
        except EmulatorError as exc:
            if not executorch:
                raise
            raise EmulatorError(
                f"{exc}. The ExecuTorch wheels need torch for aarch64: PyPI's is the CUDA build (about 3 GB of "
                f"nvidia-* wheels); its CPU build is on {TORCH_CPU_INDEX} (pass a mirror of it with "
                "--torch-index-url), or run the .pte on a board (--runner ssh) instead"
            ) from None
        tick("checking the sysroot under emulation")
        out = _run(
            [
                qemu,
                "-L",
                str(root),
                str(root / "usr" / "bin" / "python3.11"),
                "-c",
                "import platform, numpy, onnxruntime; print(platform.machine(), onnxruntime.__version__)",
            ],
            "importing onnxruntime under emulation",
            {**os.environ, "PYTHONPATH": str(tmp / "site"), "QEMU_CPU": FALLBACK_CPU},
            timeout=600,
        )
        shutil.rmtree(tmp / "apt", ignore_errors=True)
        shutil.rmtree(debs, ignore_errors=True)
        (tmp / MARKER).write_text(
            json.dumps(
                {"suite": DEBIAN_SUITE, "packages": pkgs, "wheels": list(wheels), "check": out.strip()}, indent=2
            )
            + "\n"
        )

    write_directory(dest, build)
    tick("done")
    return dest


def pip_command(target: Path, wheels: tuple[str, ...], extra_index: str | None = None) -> list[str]:
    """The ``pip install`` that puts the aarch64 ``wheels`` into ``target`` from this host (binary wheels for
    manylinux aarch64, CPython 3.11), with ``extra_index`` beside the configured index when given."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    cmd += ["--target", str(target), "--only-binary=:all:"]
    # bookworm's glibc is 2.36; torch's aarch64 wheels are manylinux_2_28
    for tag in ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"):
        cmd += ["--platform", tag]
    cmd += ["--python-version", "3.11", "--implementation", "cp"]
    if extra_index:
        cmd += ["--extra-index-url", extra_index]
    return [*cmd, *wheels]


def sysroot_info(sysroot: str | os.PathLike | None = None) -> dict:
    """The marker of a built sysroot. Raises EmulatorError when there is none."""
    root = Path(sysroot) if sysroot else default_sysroot()
    if not (root / MARKER).is_file():
        raise EmulatorError(f"no emulator sysroot at {root}: run `edgelm emulator setup` first")
    return json.loads((root / MARKER).read_text())


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
        super().__init__(timeout_s)
        self.qemu = qemu_binary()
        self.sysroot = Path(sysroot) if sysroot else default_sysroot()
        self.info = sysroot_info(self.sysroot)
        self.cpu = cpu or FALLBACK_CPU
        if self.cpu not in QEMU_CPUS:
            raise EmulatorError(f"qemu CPU model {self.cpu!r} is not one of {', '.join(QEMU_CPUS)}")

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
        if Path(inner_name(artifact)).suffix == ".pte" and not self._has_executorch():
            return (
                f"{artifact.name}: ExecuTorch under emulation is opt-in: it needs the aarch64 torch and "
                "executorch wheels; run `edgelm emulator setup --executorch`"
            )
        return None
