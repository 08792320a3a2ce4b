"""The machine a measurement ran on: CPU model, cores, and the instruction-set features that decide int8
speed (int8 speed-ups differ several-fold between an AVX2-only and a VNNI/AMX CPU, and between Arm cores
with and without dotprod/i8mm). Standard library only: it also runs on boards."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: int8-relevant ISA features as /proc/cpuinfo names them -> their usual name. x86: AVX2, AVX-512 VNNI,
#: AVX-VNNI, AMX-INT8; Arm: dotprod (``asimddp``), i8mm, SVE, SVE2.
INT8_FEATURES = {
    "avx2": "avx2",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_int8": "amx_int8",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
}


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """``{"model", "machine", "cores", "int8_features", "load_avg_1m"}`` of this machine: the CPU model name
    (``/proc/cpuinfo``, else :func:`platform.processor`), the architecture, logical cores, the
    :data:`INT8_FEATURES` it has (in the order of that table), and the 1-minute load average (None where the
    platform has none)."""
    model, flags = "", set()
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {
        "model": model or platform.processor() or "unknown CPU",
        "machine": platform.machine(),
        "cores": os.cpu_count() or 1,
        "int8_features": [name for flag, name in INT8_FEATURES.items() if flag in flags],
        "load_avg_1m": load,
    }


def describe(info: dict) -> str:
    """One line: ``Intel Xeon (x86_64, 2 cores; int8: avx2, avx512_vnni)``."""
    feats = ", ".join(info.get("int8_features") or []) or "no int8 dot-product features"
    return f"{info.get('model')} ({info.get('machine')}, {info.get('cores')} cores; int8: {feats})"


def run_record(before: dict) -> dict:
    """The host record a benchmark's results carry: :func:`cpu_info` taken now, plus the 1-minute load
    average when the run began (``before``: a :func:`cpu_info` taken then) and when it ended, as
    ``load_avg_1m_before`` / ``load_avg_1m_after``. A load near the core count means other work shared the
    CPU while the figures were measured."""
    after = cpu_info()
    return {**after, "load_avg_1m_before": before.get("load_avg_1m"), "load_avg_1m_after": after.get("load_avg_1m")}


def describe_run(host: dict) -> str:
    """One sentence for a results table: the CPU (:func:`describe`), the load average before and after the run
    where :func:`run_record` recorded them, and the reminder that host speed-ups are not device speed-ups."""
    line = f"Host: {describe(host)}"
    if "load_avg_1m_before" in host:
        line += f"; load average {host['load_avg_1m_before']} before, {host['load_avg_1m_after']} after"
    return line + ". Host speed-ups are not phone or board speed-ups."
