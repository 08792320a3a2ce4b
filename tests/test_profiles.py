import pytest

from edgelm.errors import ProfileError
from edgelm.profiles import all_profiles, available_profiles, load_profile, load_profile_file

REQUIRED = {
    "pixel8",
    "galaxy-s24",
    "iphone-15-pro",
    "raspberry-pi-5",
    "raspberry-pi-zero-2w",
    "jetson-orin-nano",
    "android-low-end",
    "x86-64-host",
}

PIXEL8 = (
    'name = "p"\ndisplay_name = "P"\nkind = "phone"\n'
    '[hardware]\nsoc = "S"\ncpu = "C"\ncpu_cores = 8\narch = "arm64"\nisa_features = ["neon"]\nram_mb = 4096\n'
    "cpu_gflops_fp32 = 20.0\ncpu_gops_int8 = 80.0\nmemory_bandwidth_gbs = 10.0\n"
    '[runtimes]\nexecutorch_backends = ["xnnpack"]\ntflite_delegates = ["xnnpack"]\n'
    'onnx_execution_providers = ["CPUExecutionProvider"]\n'
    "[budgets]\nmax_artifact_mb = 64\nmax_peak_ram_mb = 256\ntarget_latency_ms = 20\nlatency_seq_len = 128\n"
    '[quantization]\nonnx = "int8_dynamic"\n'
    '[validation]\nrunner = "adb"\n'
)


def test_every_builtin_profile_validates_and_states_facts():
    names = set(available_profiles())
    assert REQUIRED <= names
    for p in all_profiles():
        assert p.hardware.cpu_cores > 0 and p.hardware.ram_mb > 0
        assert p.hardware.isa_features, p.name
        assert p.budgets.max_artifact_mb > 0 and p.budgets.target_latency_ms > 0
        assert p.formats, p.name


def test_profile_facts():
    assert load_profile("pixel8").hardware.soc == "Google Tensor G3"
    zero = load_profile("raspberry-pi-zero-2w")
    assert zero.hardware.ram_mb == 512 and "dotprod" not in zero.hardware.isa_features
    assert load_profile("android-low-end").hardware.cpu.count("Cortex-A55") == 2
    assert load_profile("x86-64-host").hardware.arch == "x86_64"


def test_custom_profile_path(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(PIXEL8)
    p = load_profile(str(f))
    assert p.name == "p" and p.formats == ["onnx"] and p.validation.threads == 4


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda t: t.replace('kind = "phone"', 'kind = "phone"\ncolour = "blue"'), "unknown key 'colour'"),
        (
            lambda t: t.replace(
                "ram_mb = 4096\ncpu_gflops_fp32 = 20.0\ncpu_gops_int8 = 80.0\nmemory_bandwidth_gbs = 10.0\n", ""
            ),
            "missing field 'hardware.ram_mb'",
        ),
        (lambda t: t.replace("cpu_cores = 8", 'cpu_cores = "eight"'), "key 'hardware.cpu_cores'"),
        (lambda t: t.replace('onnx = "int8_dynamic"', 'onnx = "int3"'), "unknown scheme 'int3'"),
        (lambda t: t.replace('onnx = "int8_dynamic"', 'coreml = "fp32"'), "unknown format 'coreml'"),
        (lambda t: t.replace('runner = "adb"', 'runner = "ssh"'), "validation.ssh"),
        (lambda t: t + "[broken\n", "not valid TOML"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, edit, expected):
    f = tmp_path / "bad.toml"
    f.write_text(edit(PIXEL8))
    with pytest.raises(ProfileError) as e:
        load_profile_file(f)
    assert expected in str(e.value)
    assert str(f) in str(e.value)


def test_unknown_device_suggests_near_names():
    with pytest.raises(ProfileError) as e:
        load_profile("pixel-8")
    assert "Did you mean pixel8" in str(e.value)
    with pytest.raises(ProfileError, match="Known devices"):
        load_profile("toaster")
