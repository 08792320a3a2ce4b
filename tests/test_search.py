"""The accuracy-budget search and the compression options of `edgelm export`, end to end on tiny models."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.profiles import profiles_dir

runner = CliRunner()


def run_cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "200"})
    return result.exit_code, result.output


GATE_KEYS = ("min_cosine", "min_top1_agreement", "max_accuracy_drop")


def _profile(tmp_path, **changes):
    """x86-64-host's profile with some values replaced (a budget) or gates added (a tighter gate)."""
    lines = (
        (profiles_dir() / "x86-64-host.toml").read_text().replace('name = "x86-64-host"', 'name = "dev"').splitlines()
    )
    gates = [f"{k} = {v}" for k, v in changes.items() if k in GATE_KEYS]
    for key, value in changes.items():
        if key not in GATE_KEYS:
            i = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == key)
            lines[i] = f"{key} = {value}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dev.toml"
    path.write_text("\n".join(lines + (["[gates]", *gates] if gates else [])) + "\n")
    return path


@pytest.fixture(scope="module")
def boundary_classifier(tmp_path_factory, memo_tsv):
    """A tiny classifier whose head puts half of ``memo_tsv`` on each side of the decision boundary with
    small margins: the fp32 artifact agrees with PyTorch on every sentence, a 4-bit one does not."""
    import torch
    import transformers

    from edgelm.data import PROBE_SENTENCES, load_tokenizer
    from edgelm.testing import make_checkpoint

    d = make_checkpoint(tmp_path_factory.mktemp("boundary"), kind="classifier", seed=4)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = load_tokenizer(d, 32)
    encs = tok.encode_batch(list(PROBE_SENTENCES))
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.no_grad():
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
        w = torch.randn(2, pooled.shape[1], generator=torch.Generator().manual_seed(0))
        margin = (pooled @ (w[1] - w[0])).sort().values
        middle = len(margin) // 2  # the boundary halfway between the two middle sentences: no exact tie
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(torch.tensor([float(margin[middle - 1] + margin[middle]) / 2, 0.0]))
        gaps = (margin - model.classifier.bias[0]).abs()
        assert float(gaps.min()) > 1e-4  # fp32 rounding cannot flip a sentence
    model.save_pretrained(d)
    return d


def _search(tmp_path, model, data, profile, *extra, fmt="onnx", max_sparsity=0.3):
    out = tmp_path / "dist"
    code, text = run_cli(
        "export",
        "-d",
        profile,
        "-m",
        model,
        "--data",
        data,
        "-o",
        out,
        "-f",
        fmt,
        "--seq-len",
        32,
        "--search",
        "--max-sparsity",
        max_sparsity,
        *extra,
    )
    return code, text, out


def test_loose_budget_picks_the_fastest_and_tight_budget_a_milder_one(
    tiny_classifier, boundary_classifier, memo_tsv, tmp_path
):
    """A loose budget takes the fastest candidate; a tight one (every prediction of a classifier whose margins
    are tiny must stay) makes the search back off through the ladder until one fits. ONNX for both: its
    exports take seconds, and the search itself does not depend on the format."""
    loose = _profile(tmp_path / "a", min_top1_agreement=0.5, max_accuracy_drop=100.0)
    code, text, out = _search(tmp_path / "a", tiny_classifier, memo_tsv, loose)
    assert code == 0, text
    report = json.loads((out / "dev" / "report.json").read_text())
    cands = report["search"]["candidates"]
    chosen = [c for c in cands if c["status"] == "chosen"]
    assert len(chosen) == 1 and cands[0]["status"] == "chosen"  # the fastest candidate fits a loose budget
    assert chosen[0]["sparsity"] == 0.3 and chosen[0]["scheme"] == "8da4w"
    manifest = json.loads((out / "dev" / "manifest.json").read_text())
    art = manifest["artifacts"][0]
    assert art["sparsity"] == 0.3 and art["file"] == "model.8da4w.onnx" and (out / "dev" / art["file"]).is_file()
    assert "reference_sparsity_30" in np.load(out / "dev" / "golden.npz").files
    assert "Accuracy-budget search" in (out / "dev" / "report.md").read_text()
    assert not (out / "dev" / "search").exists()

    tight = _profile(tmp_path / "b", min_top1_agreement=1.0, max_accuracy_drop=100.0)
    code, text, out = _search(tmp_path / "b", boundary_classifier, memo_tsv, tight, max_sparsity=0)
    assert code == 0, text
    cands = json.loads((out / "dev" / "report.json").read_text())["search"]["candidates"]
    tried = [c for c in cands if c["accuracy"] is not None]
    chosen = next(c for c in cands if c["status"] == "chosen")
    assert len(tried) > 1 and all(c["status"].startswith("rejected: min_top1_agreement") for c in tried[:-1])
    assert cands[0]["scheme"] == "8da4w" and chosen["scheme"] != "8da4w"
    assert chosen["est_latency_ms"] >= cands[0]["est_latency_ms"]


def test_impossible_budget_names_the_closest_candidate(trained_classifier, memo_tsv, tmp_path):
    code, text, out = _search(tmp_path, trained_classifier, memo_tsv, _profile(tmp_path, max_artifact_mb=0.001))
    assert code == 1, text
    assert "no onnx candidate fits the budgets" in text and "closest: 30% pruned, 8da4w, estimated" in text
    assert "Traceback" not in text and not out.exists()


def test_time_limit_is_reported(trained_classifier, memo_tsv, tmp_path):
    code, text, _ = _search(tmp_path, trained_classifier, memo_tsv, _profile(tmp_path), "--search-time", 0)
    assert code == 1 and "time limit was reached" in text


def test_search_needs_labels_and_a_classifier(tiny_bert, trained_classifier, tmp_path):
    unlabeled = tmp_path / "u.tsv"
    unlabeled.write_text("sentence\na fine film\nanother one\n")
    code, text, out = _search(tmp_path, trained_classifier, unlabeled, "x86-64-host")
    assert code == 2 and "label column" in text and not out.exists()
    code, text = run_cli("export", "-d", "x86-64-host", "-m", tiny_bert, "-o", tmp_path / "d", "--prune", 0.3)
    assert code == 2 and "fine-tuned classifier" in text


def test_export_with_pruning_distillation_and_static_int8(trained_classifier, memo_tsv, tmp_path):
    out = tmp_path / "dist"
    code, text = run_cli(
        "export",
        "-d",
        "x86-64-host",
        "-m",
        trained_classifier,
        "--data",
        memo_tsv,
        "-o",
        out,
        "-f",
        "onnx,executorch",
        "--quant",
        "onnx=int8_static,executorch=8da4w",
        "--seq-len",
        32,
        "--prune",
        0.5,
        "--train-data",
        memo_tsv,
    )
    assert code in (0, 1), text
    report = json.loads((out / "x86-64-host" / "report.json").read_text())
    assert report["compression"]["distill_epochs"] == 1
    assert report["compression"]["encoder_parameters_after"] < 0.8 * report["compression"]["encoder_parameters_before"]
    for a in report["artifacts"]:
        assert a["sparsity"] == 0.5 and a["estimate"]["latency_ms"] > 0 and a["fidelity"]["cosine_mean"] > 0.85
    assert report["artifacts"][0]["quant"] == "int8_static (float: ffn_output+head)"


def test_finetune_compress_estimate_commands(tiny_bert, memo_tsv, tmp_path):
    ft = tmp_path / "ft"
    code, text = run_cli(
        "finetune",
        "--model",
        tiny_bert,
        "--data",
        memo_tsv,
        "--eval",
        memo_tsv,
        "--out",
        ft,
        "--epochs",
        2,
        "--lr",
        1e-3,
        "--batch-size",
        16,
        "--seq-len",
        32,
        "--optimizer",
        "sage",
    )
    assert code == 0, text
    assert "kept" in text and (ft / "model.safetensors").is_file() and (ft / "tokenizer.json").is_file()
    pruned = tmp_path / "pruned"
    code, text = run_cli(
        "compress",
        "--model",
        ft,
        "--data",
        memo_tsv,
        "--out",
        pruned,
        "--sparsity",
        0.5,
        "--method",
        "magnitude",
        "--epochs",
        0,
    )
    assert code == 0, text and "encoder parameters" in text
    code, text = run_cli("estimate", "-d", "raspberry-pi-5", "-m", pruned, "-q", "fp32,int8_dynamic", "--json")
    rows = json.loads(text)
    # fp32 on PyTorch eager, int8 on each of the profile's formats: their kernels differ, so do the figures
    assert code == 0 and [(r["scheme"], r["format"]) for r in rows] == [
        ("fp32", "pytorch"),
        ("int8_dynamic", "executorch"),
        ("int8_dynamic", "tflite"),
        ("int8_dynamic", "onnx"),
    ]
    assert rows[1]["weight_mb"] < rows[0]["weight_mb"] and rows[0]["device"] == "raspberry-pi-5"
    assert rows[3]["latency_ms"] > rows[1]["latency_ms"]
    code, text = run_cli("compress", "--model", ft, "--data", memo_tsv, "--out", tmp_path / "x", "--method", "random")
    assert code == 2 and "unknown pruning method" in text and not (tmp_path / "x").exists()
