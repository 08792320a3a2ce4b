"""The CLI as a user runs it: bad input exits 2 with one line and writes nothing; an export writes a
complete, checksummed dist/<device>/; a missed gate exits 1."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

import exporters
from edgelm.cli import app
from edgelm.profiles import profiles_dir

runner = CliRunner()


def run_cli(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    return result.exit_code, result.output


def assert_clean_failure(code, output, out_dir, expected):
    assert code == 2, output
    assert expected in output
    assert "Traceback" not in output
    assert not out_dir.exists(), "a failed run must not leave an output folder"


def test_devices_table_and_show():
    code, out = run_cli("devices")
    assert code == 0 and "pixel8" in out and "raspberry-pi-zero-2w" in out and "Google Tensor G3" in out
    code, out = run_cli("devices", "show", "raspberry-pi-5")
    assert code == 0 and "Cortex-A76" in out and "hardware.ram_mb" in out
    code, out = run_cli("devices", "show", "raspbery-pi-5")
    assert code == 2 and "Did you mean raspberry-pi-5" in out


def test_recipe_command():
    code, out = run_cli("recipe", "--device", "pixel8", "--quant", "fp32", "--format", "onnx,tflite")
    assert code == 0
    data = json.loads(out)
    assert [p["artifact"] for p in data["plans"]] == ["model.fp32.onnx", "model.fp32.tflite"]


def test_unknown_device(tmp_path):
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel-8", "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "Did you mean pixel8")


def test_missing_model_dir(tmp_path):
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel8", "--model", str(tmp_path / "nope"), "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "model directory not found")


def test_corrupt_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel8", "--model", str(tmp_path / "m"), "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "is corrupt")


def test_corrupt_weights(tiny_bert, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_bert, model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel8", "--model", str(model), "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "missing or corrupt")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel8", "--model", str(tmp_path / "gpt"), "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "unsupported architecture 'gpt2'")


def test_unreadable_data_file(tiny_bert, tmp_path):
    out_dir = tmp_path / "dist"
    code, out = run_cli(
        "export",
        "--device",
        "pixel8",
        "--model",
        str(tiny_bert),
        "--data",
        str(tmp_path / "missing.tsv"),
        "--out",
        str(out_dir),
    )
    assert_clean_failure(code, out, out_dir, "data file not found")


def test_data_without_text_column(tiny_bert, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("id,score\n1,0.5\n")
    out_dir = tmp_path / "dist"
    code, out = run_cli(
        "export", "--device", "pixel8", "--model", str(tiny_bert), "--data", str(data), "--out", str(out_dir)
    )
    assert_clean_failure(code, out, out_dir, "has no text column")


def test_unsupported_quant_is_an_error(tmp_path):
    out_dir = tmp_path / "dist"
    code, out = run_cli("export", "--device", "pixel8", "--quant", "int2", "--out", str(out_dir))
    assert_clean_failure(code, out, out_dir, "cannot do quantization 'int2'")


def test_runtime_not_installed(tiny_bert, tmp_path):
    """A converter that is not installed: hidden from a real subprocess by a meta-path blocker."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "litert_torch":
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None
        sys.meta_path.insert(0, Block())
    """)
    )
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out_dir = tmp_path / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgelm.cli",
            "export",
            "--device",
            "pixel8",
            "--model",
            str(tiny_bert),
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert_clean_failure(proc.returncode, proc.stdout + proc.stderr, out_dir, "litert-torch is not installed")
    assert "pip install litert-torch" in proc.stderr


def _check_bundle(bundle, n_artifacts):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["artifacts"]) == n_artifacts
    for art in manifest["artifacts"]:
        assert exporters.sha256_file(bundle / art["file"]) == art["sha256"]
        assert (bundle / art["file"]).stat().st_size == art["size_bytes"]
        assert art["runtime"]
    assert exporters.sha256_file(bundle / "golden.npz") == manifest["golden"]["sha256"]
    for name in ("tokenizer.json", "vocab.txt", "report.md", "report.json"):
        assert (bundle / name).is_file(), name
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"
    return manifest, json.loads((bundle / "report.json").read_text())


def test_export_tiny_model_all_formats(tiny_bert, tmp_path, capfd):
    out_dir = tmp_path / "dist"
    code, out = run_cli(
        "export",
        "--device",
        "pixel8",
        "--model",
        str(tiny_bert),
        "--out",
        str(out_dir),
        "--seq-len",
        "64",
        "--threads",
        "1",
    )
    assert code == 0, out
    assert "PASS" in out and "FAIL" not in out
    # in a log, one line per stage and the count exact: 3 exports + load, reference, write, check, report
    # (the stages go to the terminal's stderr, which the pipeline keeps while it captures the converters)
    stages = [line for line in capfd.readouterr().err.splitlines() if line[:1] == "[" and "/8]" in line]
    assert stages[0] == "[1/8] loading model" and stages[-2:] == ["[8/8] writing the report", "[8/8] done"]
    manifest, report = _check_bundle(out_dir / "pixel8", 3)
    assert manifest["recipe"]["seq_len"] == 64 and manifest["device"]["name"] == "pixel8"
    assert report["passed"] and len(report["artifacts"]) == 3
    # every figure names its machine: the host CPU and its int8 features, in the report and the terminal
    host = report["reference"]["host"]
    assert host["model"] and host["cores"] >= 1 and isinstance(host["int8_features"], list)
    assert f"- **Host:** {host['model']}" in (out_dir / "pixel8" / "report.md").read_text()
    for a in report["artifacts"]:
        assert a["fidelity"]["cosine_mean"] >= 0.99
        assert a["latency"]["p50_ms"] > 0 and a["peak_rss_mb"] > 0 and a["threads"] == 1
    golden = np.load(out_dir / "pixel8" / "golden.npz")
    assert golden["input_ids"].shape == (74, 64) and golden["reference"].shape == (74, 64)
    # a second run replaces the folder in place
    code, out = run_cli(
        "export",
        "--device",
        "pixel8",
        "--model",
        str(tiny_bert),
        "--out",
        str(out_dir),
        "--seq-len",
        "64",
        "--format",
        "onnx",
        "--quant",
        "fp32",
    )
    assert code == 0, out
    manifest, _ = _check_bundle(out_dir / "pixel8", 1)
    assert not (out_dir / "pixel8" / "model.int8_dynamic.pte").exists()


def test_export_classifier_with_labels(tiny_classifier, labeled_tsv, tmp_path):
    out_dir = tmp_path / "dist"
    code, out = run_cli(
        "export",
        "--device",
        "x86-64-host",
        "--model",
        str(tiny_classifier),
        "--data",
        str(labeled_tsv),
        "--out",
        str(out_dir),
        "--format",
        "onnx",
        "--quant",
        "fp32",
        "--seq-len",
        "32",
    )
    assert code == 0, out
    manifest, report = _check_bundle(out_dir / "x86-64-host", 1)
    assert manifest["labels"] == ["negative", "positive"] and manifest["model"]["output"] == "logits"
    fid = report["artifacts"][0]["fidelity"]
    assert fid["top1_agreement"] == 1.0
    assert fid["accuracy"] == pytest.approx(report["reference"]["accuracy"])
    assert fid["accuracy_drop"] == pytest.approx(0.0)
    golden = np.load(out_dir / "x86-64-host" / "golden.npz")
    assert golden["labels"].tolist() == [i % 2 for i in range(40)]


def test_missed_gate_exits_1_and_keeps_the_report(tiny_bert, tmp_path):
    profile = tmp_path / "tiny-budget.toml"
    text = (profiles_dir() / "x86-64-host.toml").read_text()
    profile.write_text(
        text.replace('name = "x86-64-host"', 'name = "tiny-budget"').replace(
            "max_artifact_mb = 512", "max_artifact_mb = 0.01"
        )
    )
    out_dir = tmp_path / "dist"
    code, out = run_cli(
        "export",
        "--device",
        str(profile),
        "--model",
        str(tiny_bert),
        "--out",
        str(out_dir),
        "--format",
        "onnx",
        "--seq-len",
        "32",
    )
    assert code == 1, out
    assert "FAIL" in out and "max_size_mb" in out
    report = json.loads((out_dir / "tiny-budget" / "report.json").read_text())
    assert report["passed"] is False
    gate = report["artifacts"][0]["gates"]["max_size_mb"]
    assert gate["passed"] is False and gate["limit"] == 0.01
