"""Integration: `edgelm export --device pixel8` on the real packaged all-MiniLM-L6-v2 (about 1.5 min)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import exporters
from edgelm.cli import app

pytestmark = pytest.mark.minilm


def test_export_pixel8_default_model(tmp_path):
    out_dir = tmp_path / "dist"
    result = CliRunner().invoke(app, ["export", "--device", "pixel8", "--out", str(out_dir)],
                                catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    bundle = out_dir / "pixel8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((bundle / "report.json").read_text())
    assert report["passed"] is True
    assert manifest["model"]["num_parameters"] == pytest.approx(22.6e6, rel=0.01)
    assert {a["format"] for a in manifest["artifacts"]} == {"executorch", "tflite", "onnx"}
    for art in manifest["artifacts"]:
        assert exporters.sha256_file(bundle / art["file"]) == art["sha256"]
        assert art["quantization"]["scheme"] == "int8_dynamic"
        assert art["size_bytes"] < 30e6  # int8 weights and 8-bit embeddings: ~23-27 MB, fp32 is ~90 MB
    for a in report["artifacts"]:
        assert a["passed"] and a["fidelity"]["cosine_mean"] >= 0.99, a
        assert a["speedup_vs_eager"] > 1.5, a  # int8 runtimes beat PyTorch eager fp32 on the same host
    golden = np.load(bundle / "golden.npz")
    assert golden["reference"].shape == (74, 384)
    np.testing.assert_allclose(np.linalg.norm(golden["reference"], axis=1), 1.0, atol=1e-5)
