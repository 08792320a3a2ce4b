"""`edgelm validate` and the runtime_tests suite over a whole bundle: host, the arm64 emulator, a loopback SSH
board, a board that drops mid-bundle, and the adb runner (command construction, the real adb's "no device"
error, the app's results JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import start_sshd
from typer.testing import CliRunner

import exporters
from edgelm.cli import app
from edgelm.errors import ValidationError
from edgelm.validate import bundle as vb
from edgelm.validate.runners import (
    DEVICE_RESULTS_SCHEMA,
    AdbRunner,
    BundleJob,
    SSHRunner,
    make_runner,
    parse_device_results,
)

cli = CliRunner()
FORMATS = ("model.int8_dynamic.pte", "model.int8_dynamic.tflite", "model.int8_dynamic.onnx")


@pytest.fixture(scope="module")
def exported(pixel8_bundle) -> Path:
    return pixel8_bundle


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    dest = tmp_path / "pixel8"
    shutil.copytree(exported, dest)
    return dest


def _suite(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(vb.runtime_tests_dir()),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(vb.runtime_tests_dir()),
            "-rfs",
            "--bundle",
            str(bundle),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_host_emulator_and_ssh_board_side_by_side(exported, sysroot, board, memo_tsv):
    """The runtime_tests suite on the host, `edgelm validate` under the emulator and on the loopback board: one
    validation.json with three runners and one side-by-side table in report.md."""
    target, key, known, _ = board
    proc = _suite(exported, "--runner", "host", "--data", str(memo_tsv), "--runs", "3", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and "failed" not in proc.stdout

    r = cli.invoke(
        app,
        [
            "validate",
            str(exported),
            "--runner",
            "emulator",
            "--sysroot",
            str(sysroot),
            "--data",
            str(memo_tsv),
            "--runs",
            "3",
            "--warmup",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "functional only" in r.output and "edgelm emulator setup --executorch" in r.output.replace("\n", " ")

    r = cli.invoke(
        app,
        [
            "validate",
            str(exported),
            "--runner",
            target,
            "--key",
            str(key),
            "--known-hosts",
            str(known),
            "--remote-python",
            sys.executable,
            "--runs",
            "3",
            "--warmup",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output

    doc = json.loads((exported / "validation.json").read_text())
    assert set(doc["runners"]) == {"host", "emulator", target}
    host, emu, ssh = doc["runners"]["host"], doc["runners"]["emulator"], doc["runners"][target]
    assert host["passed"] and emu["passed"] and ssh["passed"]
    assert emu["qemu_cpu"] == "cortex-a76" and emu["emulated"] is True  # pixel8's validation.emulator_cpu
    # ExecuTorch under emulation is opt-in: skipped, not failed; ONNX and TFLite ran as aarch64
    assert emu["artifacts"]["model.int8_dynamic.pte"]["status"] == "skipped"
    for name in FORMATS[1:]:
        a = emu["artifacts"][name]
        assert a["status"] == "passed" and a["machine"] == "aarch64"
        assert a["latency"]["emulated"] is True and a["vs_host"]["max_abs_diff"] < 1e-3
        assert a["vs_host"]["top1_agreement"] == 1.0
        # the eval set ran on both and the emulator's accuracy is compared with the host's
        assert (
            a["eval"]["rows"] == 74 and "below the same artifact on the host" in a["checks"]["eval_accuracy"]["detail"]
        )
    for name in FORMATS:
        h, s = host["artifacts"][name], ssh["artifacts"][name]
        assert h["status"] == "passed" and set(h["checks"]) == {
            "sha256",
            "ran",
            "golden",
            "accuracy",
            "eval_accuracy",
            "latency",
        }
        assert h["latency"]["runs"] == 3 and h["latency"]["warmup"] == 1 and h["latency"]["p50_ms"] > 0
        assert h["fidelity"]["accuracy"] == pytest.approx(h["fidelity"]["reference_accuracy"], abs=1.0)
        assert s["status"] == "passed" and s["vs_host"]["max_abs_diff"] < 1e-5 and "eval" not in s
    report = (exported / "report.md").read_text()
    assert report.count(vb.REPORT_MARKER) == 1 and "# " in report.split(vb.REPORT_MARKER)[0]  # export part kept
    table = report.split("## On-target validation: side by side")[1].split("## Validation on")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| model.")]
    assert len(rows) == 9  # every artifact on every runner, the skipped .pte too
    assert sum("functional only" in ln for ln in rows) == 2
    for heading in ("## Validation on host: PASSED", "## Validation on emulator: PASSED", f"## Validation on {target}"):
        assert heading in report


def test_tampered_and_broken_artifacts_fail_their_checks(bundle_copy):
    """An artifact whose sha256 differs from the manifest is never loaded (the target checks before it loads);
    a broken artifact whose checksum matches fails to run there; the others still pass; validate exits 1."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["artifacts"][2]["sha256"] = "0" * 64  # model.int8_dynamic.onnx
    tfl = bundle_copy / "model.int8_dynamic.tflite"
    tfl.write_bytes(tfl.read_bytes()[:4096])
    manifest["artifacts"][1]["sha256"] = exporters.sha256_file(tfl)  # consistent, but broken
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    r = cli.invoke(app, ["validate", str(bundle_copy), "--runs", "2", "--warmup", "0"])
    assert r.exit_code == 1, r.output
    rec = json.loads((bundle_copy / "validation.json").read_text())["runners"]["host"]
    onnx, tflite, pte = (
        rec["artifacts"][n] for n in ("model.int8_dynamic.onnx", "model.int8_dynamic.tflite", "model.int8_dynamic.pte")
    )
    assert onnx["status"] == "error" and not onnx["checks"]["sha256"]["passed"]
    assert "not loaded" in onnx["error"] and "fidelity" not in onnx
    assert tflite["status"] == "error" and not tflite["checks"]["ran"]["passed"]
    assert tflite["checks"]["sha256"]["passed"]
    assert pte["status"] == "passed"
    assert "model.int8_dynamic.onnx: sha256" in r.output and "model.int8_dynamic.tflite: ran" in r.output
    assert rec["passed"] is False


def test_golden_tolerance_depends_on_the_quantization(bundle_copy):
    """The same outputs pass as int8 (25% of the reference's range) and fail as fp32 (0.1%)."""
    b = vb.Bundle.load(bundle_copy)
    name = "model.int8_dynamic.onnx"
    ref = b.reference(name)
    pred = ref + 0.05 * np.abs(ref).max() * np.sign(ref)  # 5% of the range, same direction: cosine stays high
    from edgelm.validate.metrics import fidelity

    fid = fidelity(pred, ref, "classifier")
    assert vb.golden_check(b, name, fid, ref)["passed"]
    b.plan(name).quant.scheme = "fp32"
    fp32 = vb.golden_check(b, name, fid, ref)
    assert not fp32["passed"] and "max error" in fp32["detail"] and "(fp32)" in fp32["detail"]
    b.plan(name).quant.scheme = "int8_dynamic"
    b.plan(name).gates.min_cosine = 1.0  # a classifier has no cosine gate
    assert vb.golden_check(b, name, fid, ref)["passed"]
    b.plan(name).gates.min_top1_agreement = 1.01
    assert "top-1" in vb.golden_check(b, name, fid, ref)["detail"]


def test_a_board_that_drops_keeps_the_results_already_received(bundle_copy, tmp_path):
    """sshd is stopped after the first artifact's results came back: those are kept, the rest are "not run",
    and the record says the runner dropped."""
    d = tmp_path / "sshd"
    d.mkdir()
    target, key, known, _, proc = start_sshd(d)
    try:
        b = vb.Bundle.load(bundle_copy)
        runner = SSHRunner(target, key_file=key, known_hosts=known, remote_python=sys.executable, connect_timeout_s=3)

        def progress(desc, done, total):
            if done == 1:
                proc.terminate()
                proc.wait(timeout=10)

        results = vb.run_bundle(b, runner, threads=1, warmup=0, runs=2, progress=progress)
    finally:
        if proc.poll() is None:
            proc.terminate()
    rec = vb.evaluate(b, results)
    first, *rest = FORMATS
    assert rec["artifacts"][first]["status"] == "passed"
    assert [rec["artifacts"][n]["status"] for n in rest] == ["not run", "not run"]
    assert "failed twice" in rec["dropped"] and rec["passed"] is False
    vb.write_validation(b, rec)
    assert "**runner dropped**" in (bundle_copy / "report.md").read_text()
    proc2 = _suite(bundle_copy, "--runner", target, "--results", str(results))
    assert proc2.returncode == 1 and "dropped" in proc2.stdout


@pytest.fixture
def adb():
    if shutil.which("adb") is None:
        pytest.skip("adb not installed: apt-get install adb")
    yield shutil.which("adb")
    subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)


def test_adb_runner_commands(exported, adb, tmp_path):
    r = make_runner("adb:R5CX21ABC")
    assert isinstance(r, AdbRunner) and r.serial == "R5CX21ABC"
    job = BundleJob(
        exported, list(FORMATS), exported / "golden.npz", tmp_path / "eval.npz", threads=4, warmup=2, runs=7
    )
    remote = "/sdcard/Android/data/dev.edgelm.demo/files/edgelm/pixel8"
    rm, mkdir, push = r.push_commands(job, "R5CX21ABC")
    assert rm == [adb, "-s", "R5CX21ABC", "shell", f"rm -rf {remote}"]
    assert mkdir == [adb, "-s", "R5CX21ABC", "shell", f"mkdir -p {remote}"]
    assert push[:4] == [adb, "-s", "R5CX21ABC", "push"] and push[-1] == remote + "/"
    app = exported / "android" / "edgelm"
    assert {Path(p).name for p in push[4:-1]} == {
        "manifest.json",
        "vocab.txt",
        "labels.json",
        "golden.npz",
        "eval.npz",
        *FORMATS,
    }
    assert all(Path(p).parent == app for p in push[4:-1] if Path(p).name != "eval.npz")  # the app's bundle
    inst = r.instrument_command(job, "R5CX21ABC")
    assert inst[:4] == [adb, "-s", "R5CX21ABC", "shell"]
    assert inst[4] == (
        f"am instrument -w -e bundle {remote} -e artifacts {','.join(FORMATS)} -e golden golden.npz "
        f"-e warmup 2 -e runs 7 -e results {remote}/edgelm-results.json -e threads 4 -e eval eval.npz "
        "dev.edgelm.demo.test/androidx.test.runner.AndroidJUnitRunner"
    )
    assert r.pull_command(job, "R5CX21ABC", tmp_path / "r.json") == [
        adb,
        "-s",
        "R5CX21ABC",
        "pull",
        f"{remote}/edgelm-results.json",
        str(tmp_path / "r.json"),
    ]
    # a bundle directory with a space in its name stays one argument on the device shell
    spaced = BundleJob(Path("/x/my bundle"), ["m.onnx"], Path("/x/my bundle/golden.npz"))
    with pytest.raises(ValidationError, match="--bundle android"):
        r.push_commands(spaced, "S")
    assert "'/sdcard/Android/data/dev.edgelm.demo/files/edgelm/my bundle'" in r.instrument_command(spaced, "S")[4]
    with pytest.raises(ValidationError, match="use adb or adb:SERIAL"):
        AdbRunner("adb;reboot")


def test_adb_runner_says_no_device_with_the_real_adb(exported, adb, tmp_path):
    assert AdbRunner("adb").devices() == []
    with pytest.raises(ValidationError, match="no Android device: `adb devices` lists none"):
        AdbRunner("adb").select_device()
    with pytest.raises(ValidationError, match="no Android device R5CX21ABC attached"):
        AdbRunner("adb:R5CX21ABC").select_device()
    r = cli.invoke(app, ["validate", str(exported), "--runner", "adb"])
    assert r.exit_code == 2 and "no Android device" in r.output
    assert not (exported / "validation" / "adb").exists()


def test_device_results_json_round_trip(bundle_copy, tmp_path):
    """The results JSON the Android app writes, filled with the host's outputs, reads back into a record
    that passes; another schema, a missing artifact and a phone-side error are each reported."""
    b = vb.Bundle.load(bundle_copy)
    host = vb.run_bundle(b, make_runner("host"), artifacts=["model.int8_dynamic.onnx"], warmup=0, runs=2)
    out = np.load(host / "model.int8_dynamic.onnx.outputs.npy")
    doc = {
        "schema": DEVICE_RESULTS_SCHEMA,
        "device": {"model": "Pixel 8", "abi": "arm64-v8a", "sdk": 35},
        "artifacts": [
            {
                "artifact": "model.int8_dynamic.onnx",
                "error": None,
                "format": "onnx",
                "runtime": {"onnxruntime-android": "1.22"},
                "threads": 4,
                "warmup": 2,
                "runs": 3,
                "latency_seq_len": 32,
                "latency_samples_ms": [3.1, 2.9, 3.0],
                "load_ms": 41.0,
                "peak_rss_mb": 88.0,
                "outputs": out.tolist(),
                "eval_outputs": None,
            },
            {"artifact": "model.int8_dynamic.tflite", "error": "Interpreter: unsupported op"},
        ],
    }
    runs = parse_device_results(json.loads(json.dumps(doc)), list(FORMATS))
    by = {r.artifact: r for r in runs}
    assert np.allclose(by["model.int8_dynamic.onnx"].result.outputs, out)
    assert by["model.int8_dynamic.onnx"].result.result["machine"] == "arm64-v8a"
    assert "unsupported op" in by["model.int8_dynamic.tflite"].error
    assert "reported no result" in by["model.int8_dynamic.pte"].error
    with pytest.raises(ValidationError, match="not edgelm-device-results/1"):
        parse_device_results({"schema": "other"}, list(FORMATS))
    store_dir = tmp_path / "adb"
    store_dir.mkdir()
    store = vb.ResultStore(store_dir)
    for run in runs:
        store.save(run)
    (store_dir / "runner.json").write_text(
        json.dumps(
            {"runner": "adb", "kind": "adb", "emulated": False, "artifacts": list(FORMATS), "warmup": 2, "runs": 3}
        )
    )
    rec = vb.evaluate(b, store_dir)
    onnx = rec["artifacts"]["model.int8_dynamic.onnx"]
    assert onnx["status"] == "passed" and onnx["latency"]["p50_ms"] == pytest.approx(3.0)
    assert rec["artifacts"]["model.int8_dynamic.tflite"]["status"] == "error" and rec["passed"] is False


def test_validate_refuses_bad_input(exported, tmp_path):
    r = cli.invoke(app, ["validate", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "bundle not found" in r.output
    (tmp_path / "half").mkdir()
    r = cli.invoke(app, ["validate", str(tmp_path / "half")])
    assert r.exit_code == 2 and "no manifest.json" in r.output
    (tmp_path / "half" / "manifest.json").write_text("{not json")
    r = cli.invoke(app, ["validate", str(tmp_path / "half")])
    assert r.exit_code == 2 and "is corrupt" in r.output
    (tmp_path / "half" / "manifest.json").write_text('{"artifacts": []}')
    r = cli.invoke(app, ["validate", str(tmp_path / "half")])
    assert r.exit_code == 2 and "not an edgelm-bundle/1 manifest (schema: None)" in r.output
    # a manifest with a missing field, a mistyped field, or a path that leaves the bundle: one error line each
    good = json.loads((exported / "manifest.json").read_text())
    cases = [
        (lambda m: m["golden"].pop("sha256"), "golden.sha256: Field required"),
        (lambda m: m["recipe"].update(threads="two"), "recipe.threads: Input should be a valid integer"),
        (lambda m: m["artifacts"][0].update(file="../../etc/passwd"), "is not a plain file name inside the bundle"),
        (lambda m: m["tokenizer"]["files"].append("/etc/passwd"), "is not a plain file name inside the bundle"),
    ]
    for change, message in cases:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(exported, bad, ignore=shutil.ignore_patterns("validation*"))
        m = json.loads(json.dumps(good))
        change(m)
        (bad / "manifest.json").write_text(json.dumps(m))
        r = cli.invoke(app, ["validate", str(bad)])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (bad / "validation").exists()
    # a symlink that leads out of the bundle is refused before anything runs
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x")
    (bad / "manifest.json").write_text(json.dumps(good))
    (bad / "model.int8_dynamic.onnx").unlink()
    (bad / "model.int8_dynamic.onnx").symlink_to(outside)
    r = cli.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 2 and "leads outside the bundle" in r.output and not (bad / "validation").exists()
    r = cli.invoke(app, ["validate", str(exported), "--runner", "serial://x"])
    assert r.exit_code == 2 and "unknown runner" in r.output
    r = cli.invoke(app, ["validate", str(exported), "--runner", "ssh://pi@board"])
    assert r.exit_code == 2 and "needs a key file (--key FILE)" in r.output
    r = cli.invoke(app, ["validate", str(exported), "--artifact", "model.fp32.onnx"])
    assert r.exit_code == 2 and "is not an artifact" in r.output
    embed_eval = tmp_path / "nolabels.tsv"
    embed_eval.write_text("sentence\nhello there\n")
    r = cli.invoke(app, ["validate", str(exported), "--data", str(embed_eval)])
    assert r.exit_code == 2 and "label" in r.output
    # nothing of those runs was left behind
    leftovers = [p.name for p in (exported / "validation").glob(".*")] if (exported / "validation").is_dir() else []
    assert leftovers == []
    fresh = tmp_path / "fresh"
    shutil.copytree(exported, fresh, ignore=shutil.ignore_patterns("validation*"))
    r = cli.invoke(app, ["validate", str(fresh), "--data", str(embed_eval)])
    assert r.exit_code == 2 and not (fresh / "validation").exists()


def test_runners_from_the_device_profile(bundle_copy, board, sysroot):
    """pixel8's [validation] table: emulator_cpu cortex-a76, runner adb, no SSH board; --cpu overrides."""
    target, key, known, _ = board
    b = vb.Bundle.load(bundle_copy)
    assert vb.bundle_runner(b, "emulator", sysroot=sysroot).cpu == "cortex-a76"
    assert vb.bundle_runner(b, "emulator", sysroot=sysroot, cpu="cortex-a53").cpu == "cortex-a53"
    if shutil.which("adb"):
        assert isinstance(vb.bundle_runner(b, "profile"), AdbRunner)
    with pytest.raises(ValidationError, match="names no SSH board"):
        vb.bundle_runner(b, "ssh")
    b.manifest.device.validation["ssh"] = target
    r = vb.bundle_runner(b, "ssh", key_file=key, known_hosts=known)
    assert isinstance(r, SSHRunner) and r.name == target
    b.manifest.device.validation["emulator_cpu"] = None
    b.manifest.device.hardware["cpu"] = "4x Cortex-A53 @ 1.0 GHz"
    assert vb.bundle_runner(b, "emulator", sysroot=sysroot).cpu == "cortex-a53"


def test_the_validation_side_imports_no_torch(exported):
    """Runners, bundle checks, the app bundle writer and runtime_tests run on a board with numpy + runtimes."""
    code = (
        "import sys\n"
        "import runtime_tests.conftest, edgelm.appbundle\n"
        "from edgelm.validate.bundle import Bundle, evaluate\n"
        "from edgelm.report import side_by_side_rows\n"
        "from edgelm.validate.runners import make_runner\n"
        f"b = Bundle.load({str(exported)!r}); make_runner('host')\n"
        "assert b.baseline_accuracy is not None and b.golden['input_ids'].shape[0] == 24\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
