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
