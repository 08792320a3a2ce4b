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
    result = CliRunner().invoke(
        app, ["export", "--device", "pixel8", "--out", str(out_dir)], catch_exceptions=False, env={"COLUMNS": "200"}
    )
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
        # the "x eager" column is eager p50 / this artifact's p50 on the same host (speed goals are measured in
        # benchmarks/, not asserted here: on a loaded 2-core machine the ratio moves)
        assert a["speedup_vs_eager"] == pytest.approx(report["reference"]["eager_p50_ms"] / a["latency"]["p50_ms"])
    golden = np.load(bundle / "golden.npz")
    assert golden["reference"].shape == (74, 384)
    np.testing.assert_allclose(np.linalg.norm(golden["reference"], axis=1), 1.0, atol=1e-5)


def test_minilm_schemes_and_estimate(tmp_path):
    """Static int8 (calibrated, FFN down-projections float) and 8da4w on the real MiniLM in ONNX Runtime,
    and the cost model's counts for it."""
    import torch

    from edgelm.compress.estimate import estimate
    from edgelm.data import encode, load_tokenizer, probe_dataset
    from edgelm.models import load_model
    from edgelm.pipeline import calibration_rows
    from edgelm.profiles import load_profile
    from edgelm.recipe import make_recipe
    from edgelm.schemes import quant_spec

    m = load_model("default")
    ids, mask = encode(load_tokenizer(m.tokenizer_dir, 128), probe_dataset())
    with torch.no_grad():
        ref = m.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    example = {
        "input_ids": torch.ones(1, 128, dtype=torch.int64),
        "attention_mask": torch.ones(1, 128, dtype=torch.int64),
    }
    cos = {}
    for scheme in ("int8_static", "8da4w"):
        art = exporters.get("onnx").export(
            m.module,
            example,
            quant_spec(scheme),
            tmp_path / f"{scheme}.onnx",
            exporters.ExportOptions(output_name="embeddings", calibration=calibration_rows(ids, mask)),
        )
        out = exporters.load(art.path).run({"input_ids": ids, "attention_mask": mask})["embeddings"]
        cos[scheme] = float((out * ref).sum(1).mean())  # both L2-normalised
        # fp32 is ~90 MB; static int8 keeps 6 FFN down-projections (14 MB) float
        assert art.size_bytes < {"int8_static": 36e6, "8da4w": 25e6}[scheme]
    assert cos["int8_static"] > 0.95 and cos["8da4w"] > 0.9, cos
    e = estimate(m.module, make_recipe(load_profile("pixel8")), scheme="fp32", seq_len=128)
    assert e.parameters == pytest.approx(22.7e6, rel=0.01) and e.macs == pytest.approx(1.43e9, rel=0.02)
