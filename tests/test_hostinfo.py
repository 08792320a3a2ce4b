"""Every figure names its machine: the CPU model and the int8 ISA features from /proc/cpuinfo."""

from __future__ import annotations

from edgelm import hostinfo

X86 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm
CPU implementer\t: 0x41
"""


def test_an_avx2_only_cpu_and_an_arm_core_with_dotprod(tmp_path):
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    x86 = hostinfo.cpu_info(tmp_path / "x86")
    assert x86["model"] == "AMD EPYC 7B13" and x86["int8_features"] == ["avx2"]
    assert hostinfo.describe(x86).startswith("AMD EPYC 7B13 (") and "int8: avx2)" in hostinfo.describe(x86)
    arm = hostinfo.cpu_info(tmp_path / "arm")
    assert arm["int8_features"] == ["dotprod", "i8mm"]
    none = hostinfo.cpu_info(tmp_path / "missing")
    assert none["int8_features"] == [] and "no int8 dot-product features" in hostinfo.describe(none)


def test_a_benchmark_run_records_the_load_before_and_after(tmp_path):
    import json
    import sys
    from pathlib import Path

    before = {**hostinfo.cpu_info(), "load_avg_1m": 1.75}
    host = hostinfo.run_record(before)
    assert host["load_avg_1m_before"] == 1.75 and host["load_avg_1m_after"] == host["load_avg_1m"]
    line = hostinfo.describe_run(host)
    assert line.startswith(f"Host: {hostinfo.describe(host)}; load average 1.75 before, ")
    assert line.endswith("Host speed-ups are not phone or board speed-ups.")
    assert "load average" not in hostinfo.describe_run(hostinfo.cpu_info())

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from _results import write_results
    finally:
        sys.path.pop(0)
    md = write_results("demo", {"host": host, "x": Path("a")}, ["# Demo", "", "| a |"], tmp_path)
    assert md.read_text() == "# Demo\n\n| a |\n"
    assert json.loads((tmp_path / "demo.json").read_text())["x"] == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]  # no temp file left
