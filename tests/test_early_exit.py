"""Early exit: segments that chain to the whole model on every format, the threshold choice, the compress job,
and the export + validation of an early-exit checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import exporters
from edgelm.cli import app
from edgelm.compress import early_exit as ee
from edgelm.errors import ModelError, RecipeError
from exporters.base import ArtifactLoadError, QuantSpec
from exporters.cascade import Cascade, confidence, exit_choice

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def ee_checkpoint(tmp_path_factory, trained_classifier, memo_tsv):
    """The tiny fine-tuned classifier (2 layers) with exits after layers 1 and 2, trained with the backbone
    (``--train-backbone``) on ``memo_tsv``."""
    from edgelm.compress.train import TrainConfig

    out = tmp_path_factory.mktemp("ee") / "ee"
    summary = ee.run_early_exit(
        trained_classifier,
        memo_tsv,
        out,
        exit_layers=[1],
        eval_data=memo_tsv,
        freeze_backbone=False,
        cfg=TrainConfig(epochs=6, lr=3e-3, batch_size=8, seq_len=32),
    )
    return out, summary


def _golden_rows():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 700, (5, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    return ids, mask


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
def test_segments_chained_equal_the_whole_model(tiny_classifier, tmp_path, fmt):
    import torch

    from edgelm.models import load_model

    loaded = load_model(tiny_classifier)
    model = ee.attach(loaded.module, [1]).eval()  # exits after layer 1 and 2 (the classifier's own head)
    ids, mask = _golden_rows()
    with torch.no_grad():
        torch_exits = [z.numpy() for z in model.exit_logits(torch.from_numpy(ids), torch.from_numpy(mask))]
        whole = loaded.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(torch_exits[-1] - whole).max() == 0.0  # the last exit is the whole model
    art = ee.export_cascade(model, fmt, QuantSpec("fp32"), 32, tmp_path / f"m.fp32{exporters.suffix(fmt)}.exits.json")
    assert art.path.name.endswith(".exits.json") and len(art.companions) == 2
    assert exporters.format_for_path(art.path) == fmt
    session = exporters.load(art.path, threads=1)
    chained = session.run_all({"input_ids": ids, "attention_mask": mask})
    for got, want in zip(chained, torch_exits, strict=True):
        assert np.abs(got - want).max() < 1e-4
    out = session.run({"input_ids": ids, "attention_mask": mask})  # no threshold given: never exits early
    assert (out["exit_layer"] == 2).all()
    assert np.abs(out["logits"] - whole).max() < 1e-4
    session.threshold = 0.0  # every row exits at the first exit
    out = session.run({"input_ids": ids, "attention_mask": mask})
    assert (out["exit_layer"] == 1).all()
    assert np.abs(out["logits"] - torch_exits[0]).max() < 1e-4


def test_cascade_refuses_a_changed_segment_and_a_path_outside(tiny_classifier, tmp_path):
    from edgelm.models import load_model

    model = ee.attach(load_model(tiny_classifier).module, [1]).eval()
    art = ee.export_cascade(model, "onnx", QuantSpec("fp32"), 32, tmp_path / "m.onnx.exits.json")
    seg = art.companions[1]
    seg.write_bytes(seg.read_bytes()[:-10])
    with pytest.raises(ArtifactLoadError, match="sha256"):
        exporters.load(art.path)
    d = json.loads(art.path.read_text())
    d["segments"][0]["file"] = "../evil.onnx"
    art.path.write_text(json.dumps(d))
    with pytest.raises(ArtifactLoadError, match="plain names"):
        exporters.load(art.path)
    with pytest.raises(exporters.UnsupportedQuantError, match="int8_static"):
        ee.export_cascade(model, "onnx", QuantSpec("int8_static"), 32, tmp_path / "s.onnx.exits.json")


def test_threshold_choice_takes_the_fewest_layers_within_budget():
    # 10 rows, 2 classes, exits after layers 2 and 4 (the last). Exit 0 is sure and right on rows 0-5, sure
    # and wrong on rows 6-7 (max prob 0.82), unsure on rows 8-9; the last exit is right everywhere.
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    sure = np.log(np.array([0.99, 0.01]))
    first = np.stack([sure if y == 0 else sure[::-1] for y in labels])
    first[6] = np.log([0.18, 0.82])  # wrong (label 0), max prob 0.82
    first[7] = np.log([0.82, 0.18])  # wrong (label 1)
    first[8] = first[9] = np.log([0.55, 0.45])
    last = np.stack([sure if y == 0 else sure[::-1] for y in labels])
    logits = [first, last]
    # budget 0: no wrong early answer allowed -> threshold above 0.82: rows 0-5 exit at layer 2
    chosen, points = ee.choose_threshold(logits, labels, [2, 4], 100.0, 0.0)
    assert len(points) >= 3 and points[0].exit_share == [0.0, 1.0]  # "never exit early" is a candidate
    assert chosen.accuracy == 100.0 and chosen.exit_share == [0.6, 0.4]
    assert chosen.mean_layers == pytest.approx(0.6 * 2 + 0.4 * 4)
    assert 0.82 < chosen.threshold <= 0.99
    # budget 20 points: the two wrong rows may exit too (80 %), and the unsure ones must not (they add nothing)
    chosen, _ = ee.choose_threshold(logits, labels, [2, 4], 100.0, 20.0)
    assert chosen.accuracy == 80.0 and chosen.exit_share == [0.8, 0.2]
    # the same rule as the runtime's
    assert (exit_choice(logits, "max_prob", chosen.threshold) == [0] * 8 + [1, 1]).all()
    # a budget nothing meets except the whole model: never exit early
    chosen, _ = ee.choose_threshold([first, first], labels, [2, 4], 100.0, 0.0)
    assert chosen.exit_share == [0.0, 1.0]
    assert confidence(np.log([[0.5, 0.5]]), "entropy")[0] == pytest.approx(np.log(2))


def test_compress_early_exit_writes_a_checkpoint_that_loads(ee_checkpoint, trained_classifier, tiny_bert, tmp_path):
    import torch

    out, summary = ee_checkpoint
    cfg = json.loads((out / ee.EXITS_FILE).read_text())
    assert cfg["exit_layers"] == [1, 2] and summary["exit_layers"] == [1, 2]
    assert len(summary["exit_accuracy"]) == 2 and summary["exit_accuracy"][-1] >= 90.0
    model, _ = ee.load_early_exit(out)
    ids, mask = _golden_rows()
    with torch.no_grad():
        a = model.exit_logits(torch.from_numpy(ids), torch.from_numpy(mask))
    again, _ = ee.load_early_exit(out)
    with torch.no_grad():
        b = again.exit_logits(torch.from_numpy(ids), torch.from_numpy(mask))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # refusals: not a classifier, exits already there, exits outside the model, corrupt heads
    with pytest.raises(ModelError, match="not a sequence classifier"):
        ee.run_early_exit(tiny_bert, "unused.tsv", tmp_path / "x")
    with pytest.raises(ModelError, match="already has exits"):
        ee.run_early_exit(out, "unused.tsv", tmp_path / "x")
    with pytest.raises(RecipeError, match=r"layers 1\.\.2"):
        ee.check_exit_layers([3], 2)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    from safetensors.torch import save_file

    save_file({"0.dense.weight": torch.zeros(2, 2)}, str(bad / ee.HEADS_FILE))
    with pytest.raises(ModelError, match="exit heads"):
        ee.load_early_exit(bad)


def test_compress_cli_early_exit(trained_classifier, memo_tsv, tmp_path):
    out = tmp_path / "ee-cli"
    r = cli(
        "compress", "--method", "early-exit", "--model", str(trained_classifier), "--data", str(memo_tsv),
        "--eval", str(memo_tsv), "--out", str(out), "--exits", "1", "--epochs", "1", "--lr", "1e-3",
        "--seq-len", "32",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "exit after layer" in r.output and "threshold" in r.output and (out / ee.HEADS_FILE).is_file()
    # the default, --freeze-backbone: the whole model is unchanged
    from edgelm.compress.train import checkpoint_accuracy

    assert checkpoint_accuracy(out, memo_tsv, seq_len=32) == checkpoint_accuracy(
        trained_classifier, memo_tsv, seq_len=32
    )
    r = cli("compress", "--method", "early-exit", "--model", str(trained_classifier), "--data", str(memo_tsv),
            "--out", str(tmp_path / "x"), "--exits", "two")  # fmt: skip
    assert r.exit_code == 2 and "--exits 'two'" in r.output


def test_export_and_validate_an_early_exit_checkpoint(ee_checkpoint, trained_classifier, memo_tsv, tmp_path):
    out, _ = ee_checkpoint
    r = cli(
        "export", "--device", "pixel8", "--model", str(out), "--data", str(memo_tsv), "--format", "onnx",
        "--out", str(tmp_path / "dist"), "--max-accuracy-drop", "5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "early exit model.int8_dynamic.onnx.exits.json" in r.output
    bundle = tmp_path / "dist" / "pixel8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    cascade = next(a for a in manifest["artifacts"] if a["file"].endswith(".exits.json"))
    assert [c["role"] for c in cascade["companions"]] == ["early-exit segment"] * 2
    policy = Cascade.read(bundle / cascade["file"])
    choice = cascade["details"]["threshold_choice"]
    assert choice["pytorch_accuracy"] - choice["chosen"]["accuracy"] <= 5.0
    assert policy.threshold == choice["chosen"]["threshold"]
    report = json.loads((bundle / "report.json").read_text())
    row = next(a for a in report["artifacts"] if a["file"] == cascade["file"])
    assert row["passed"] and row["exits"]["mean_layers"] == pytest.approx(choice["chosen"]["mean_layers"])
    assert row["sentence_latency"]["rows"] == 74
    assert "## Early exit" in (bundle / "report.md").read_text()
    # validate again on the host: the cascade's segments are checked and run in order
    r = cli("validate", str(bundle), "--runner", "host")
    assert r.exit_code == 0, r.output
    # the threshold data must be labeled
    nolabel = tmp_path / "nolabel.tsv"
    nolabel.write_text("sentence\nfine\nbad\n")
    r = cli("export", "--device", "pixel8", "--model", str(out), "--data", str(nolabel), "--format", "onnx",
            "--out", str(tmp_path / "d2"))  # fmt: skip
    assert r.exit_code == 2 and "no labels" in r.output
    r = cli("export", "--device", "pixel8", "--model", str(out), "--prune", "0.3", "--data", str(memo_tsv),
            "--out", str(tmp_path / "d3"))  # fmt: skip
    assert r.exit_code == 2 and "exports as it was trained" in r.output
    r = cli("export", "--device", "pixel8", "--model", str(trained_classifier), "--exit-data", str(memo_tsv),
            "--out", str(tmp_path / "d4"))  # fmt: skip
    assert r.exit_code == 2 and "has no exits" in r.output


def test_android_bundle_carries_the_cascades(ee_checkpoint, memo_tsv, tmp_path):
    """`--bundle android` of an early-exit checkpoint: each cascade with its segments and exit policy in the app
    manifest, judged by top-1 and accuracy (not logits' error); the app's own check runs in jvm-test.sh."""
    out, _ = ee_checkpoint
    r = cli(
        "export", "--device", "pixel8", "--model", str(out), "--data", str(memo_tsv), "--format", "onnx,tflite",
        "--seq-len", "32", "--out", str(tmp_path / "dist"), "--max-accuracy-drop", "5", "--bundle", "android",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "dist" / "pixel8"
    app = bundle / "android" / "edgelm"
    m = json.loads((app / "manifest.json").read_text())
    main = {a["file"]: a for a in json.loads((bundle / "manifest.json").read_text())["artifacts"]}
    cascades = [a for a in m["artifacts"] if a.get("cascade")]
    assert [a["file"] for a in cascades] == [
        "model.int8_dynamic.onnx.exits.json",
        "model.int8_dynamic.tflite.exits.json",
    ]
    assert len(m["artifacts"]) == 4 and all("cascade" not in a for a in m["artifacts"] if a not in cascades)
    for a in cascades:
        policy = Cascade.read(bundle / a["file"])
        c = a["cascade"]
        assert (
            c["threshold"] == policy.threshold == main[a["file"]]["details"]["threshold_choice"]["chosen"]["threshold"]
        )
        assert c["confidence"] == "max_prob" and c["exit_layers"] == [1, 2] and c["num_layers"] == 2
        assert [s["file"] for s in c["segments"]] == [comp["file"] for comp in a["companions"]]
        for seg in c["segments"]:
            assert seg["sha256"] == exporters.sha256_file(app / seg["file"])
        assert a["tolerance"]["max_abs_error"] is None and a["tolerance"]["min_top1_agreement"] == 0.95
        assert a["golden_reference"] == ee.reference_key(a["file"])
        assert a["inputs"][0]["name"] == "input_ids" and a["max_seq_len"] == 32
    tfl = next(a for a in cascades if a["runtime"] == "litert")
    assert tfl["seq_buckets"] == [16, 32] and tfl["inputs"][0]["dtype"] == "int32"
    with np.load(app / "golden.npz") as z:
        assert all(a["golden_reference"] in z.files for a in cascades)


def test_cascade_exits_on_the_arm64_emulator(sysroot, ee_checkpoint, tmp_path):
    """The cascade's segments run as aarch64 programs under qemu and take the same exits as on the host."""
    from edgelm.validate.emulator import EmulatorRunner
    from edgelm.validate.host import HostRunner

    model, _ = ee.load_early_exit(ee_checkpoint[0])
    ids, mask = _golden_rows()
    golden = tmp_path / "golden.npz"
    np.savez(golden, input_ids=ids, attention_mask=mask, latency_input_ids=ids[:1], latency_attention_mask=mask[:1])
    for fmt in ("onnx", "tflite"):
        art = ee.export_cascade(
            model, fmt, QuantSpec("int8_dynamic", embedding_bits=8), 32, tmp_path / f"m{exporters.suffix(fmt)}.exits.json",
            threshold=0.6,
        )  # fmt: skip
        host = HostRunner().run_artifact(art.path, golden, threads=1, warmup=0, runs=2)
        emu = EmulatorRunner(sysroot, cpu="cortex-a76").run_artifact(art.path, golden, threads=1, warmup=0, runs=2)
        assert emu.result["machine"] == "aarch64" and emu.result["torch_imported"] is False
        assert emu.result["exit_layers"] == host.result["exit_layers"]
        assert len(emu.result["row_latency_ms"]) == 5
        assert np.abs(emu.outputs - host.outputs).max() < 1e-3


def test_exits_on_a_pruned_checkpoint_the_width_level(trained_classifier, memo_tsv, tmp_path):
    """Elastic width: exits added to a pruned checkpoint (fewer heads and FFN neurons) export and chain to it."""
    import torch

    from edgelm.compress.jobs import run_compress
    from edgelm.compress.train import TrainConfig
    from edgelm.models import load_model

    pruned = tmp_path / "pruned"
    run_compress(trained_classifier, memo_tsv, pruned, sparsity=0.5, method="magnitude", cfg=TrainConfig(epochs=0))
    out = tmp_path / "ee"
    ee.run_early_exit(pruned, memo_tsv, out, exit_layers=[1], freeze_backbone=True, cfg=TrainConfig(epochs=2, lr=1e-3))
    model, _ = ee.load_early_exit(out)
    heads = [layer.attention.self.num_attention_heads for layer in model.layers]
    assert heads == [layer.attention.self.num_attention_heads for layer in load_model(pruned).module.base.encoder.layer]
    assert sum(heads) < 2 * 2  # the tiny model had 2 heads per layer
    ids, mask = _golden_rows()
    with torch.no_grad():
        whole = load_model(pruned).module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    art = ee.export_cascade(model, "onnx", QuantSpec("fp32"), 32, tmp_path / "m.onnx.exits.json")
    chained = exporters.load(art.path).run_all({"input_ids": ids, "attention_mask": mask})
    assert np.abs(chained[-1] - whole).max() < 1e-4
