"""Adaptation: peft LoRA / prompt tuning / scaled prompt tuning, their exports, and the hypernetwork."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_checkpoint
from typer.testing import CliRunner

import exporters
from edgelm.adapt.peft_methods import AdaptConfig, attach_peft, load_unmerged, run_adapt, sample_shots
from edgelm.cli import app
from edgelm.errors import DataError
from edgelm.models import load_model
from exporters.base import ADAPTER_MODULES, QuantSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("adapt-enc"), heads=2, seed=5)


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory, encoder, memo_tsv):
    """Two LoRA adapters of the same tiny encoder (different seeds and shots)."""
    root = tmp_path_factory.mktemp("lora")
    a = run_adapt(
        encoder, memo_tsv, root / "a", AdaptConfig(method="lora", shots=12, epochs=6, lr=5e-3, seq_len=32, seed=1)
    )
    b = run_adapt(
        encoder, memo_tsv, root / "b", AdaptConfig(method="lora", shots=8, epochs=6, lr=5e-3, seq_len=32, seed=2)
    )
    return a.out, b.out


def _feeds(n=5, seq=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 150, (n, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    ids[1, 12:] = 0
    return ids, mask


def _torch(module, ids, mask):
    with torch.no_grad():
        return module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _example(seq=32):
    return {"input_ids": torch.ones(1, seq, dtype=torch.int64), "attention_mask": torch.ones(1, seq, dtype=torch.int64)}


def test_sample_shots_draws_k_per_class_and_refuses_too_few():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 7)
    idx = sample_shots(labels, 4, seed=3)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
    assert np.array_equal(idx, sample_shots(labels, 4, seed=3))
    assert not np.array_equal(idx, sample_shots(labels, 4, seed=4))
    with pytest.raises(DataError, match="class 1 has only 5 examples"):
        sample_shots(labels, 6, seed=0)


def test_lora_merged_equals_unmerged_and_changes_the_model(lora_pair, encoder):
    merged = load_model(lora_pair[0])
    unmerged = load_unmerged(lora_pair[0])
    ids, mask = _feeds()
    assert np.abs(_torch(merged.module, ids, mask) - _torch(unmerged.module, ids, mask)).max() < 1e-5
    lora_layers = [m for n, m in unmerged.module.named_modules() if n.endswith("lora_B.default")]
    assert len(lora_layers) == 2 * 6  # 2 layers x (q, k, v, attention output, FFN in, FFN out)
    assert max(float(m.weight.abs().max()) for m in lora_layers) > 1e-3  # trained away from B = 0
    base = load_model(encoder).module.base
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged.module.base.state_dict()[q], base.state_dict()[q])
    record = json.loads((lora_pair[0] / "edgelm_adapt.json").read_text())
    assert record["examples"] == 24 and record["method"] == "lora"


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_separate_adapter_artifact_matches_merged_and_swaps(lora_pair, tmp_path, fmt):
    ids, mask = _feeds()
    a, b = load_unmerged(lora_pair[0]), load_unmerged(lora_pair[1])
    arts = []
    for name, m in (("a", a), ("b", b)):
        d = tmp_path / name
        d.mkdir()
        arts.append(
            exporters.get(fmt).export(
                m.module,
                _example(),
                QuantSpec("fp32"),
                d / f"model{exporters.suffix(fmt)}",
                exporters.ExportOptions(output_name="logits", adapter_modules=ADAPTER_MODULES),
            )
        )
    assert arts[0].sha256() == arts[1].sha256()  # one base program for both adapters
    assert arts[0].companions[0].name == f"model.adapter{'.data' if fmt == 'onnx' else '.ptd'}"
    merged_a, merged_b = load_model(lora_pair[0]), load_model(lora_pair[1])
    out_a = next(iter(exporters.load(arts[0].path).run({"input_ids": ids, "attention_mask": mask}).values()))
    out_b = next(
        iter(
            exporters.load(arts[0].path, adapter=arts[1].companions[0])
            .run({"input_ids": ids, "attention_mask": mask})
            .values()
        )
    )
    assert np.abs(out_a - _torch(merged_a.module, ids, mask)).max() < 1e-4
    assert np.abs(out_b - _torch(merged_b.module, ids, mask)).max() < 1e-4
    assert np.abs(out_a - out_b).max() > 1e-3  # the swap really changed the weights


def test_tflite_refuses_separate_adapters(lora_pair, tmp_path):
    from exporters.base import UnsupportedQuantError

    with pytest.raises(UnsupportedQuantError, match="flatbuffer"):
        exporters.get("tflite").export(
            load_unmerged(lora_pair[0]).module,
            _example(),
            QuantSpec("fp32"),
            tmp_path / "m.tflite",
            exporters.ExportOptions(adapter_modules=ADAPTER_MODULES),
        )
    r = runner.invoke(
        app, ["export", "-d", "pixel8", "-m", str(lora_pair[0]), "--lora", "separate", "--out", str(tmp_path / "dist")]
    )
    assert r.exit_code == 2 and "--format onnx,executorch" in r.output
    assert not (tmp_path / "dist").exists()


def test_export_lora_separate_with_second_adapter(lora_pair, tmp_path, memo_tsv):
    r = runner.invoke(
        app,
        [
            "export",
            "-d",
            "pixel8",
            "-m",
            str(lora_pair[0]),
            "--lora",
            "separate",
            "--adapter",
            str(lora_pair[1]),
            "-f",
            "onnx",
            "-q",
            "fp32",
            "--data",
            str(memo_tsv),
            "--seq-len",
            "32",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    d = tmp_path / "pixel8"
    manifest = json.loads((d / "manifest.json").read_text())
    comp = manifest["artifacts"][0]["companions"][0]
    assert comp["file"] == "model.fp32.adapter.data" and (d / comp["file"]).is_file()
    (row,) = manifest["adapters"]
    assert row["file"] == "model.fp32.b.adapter.data" and (d / row["file"]).is_file()
    assert row["fidelity"]["cosine_mean"] > 0.9999 and row["fidelity"]["top1_agreement"] == 1.0
    report = json.loads((d / "report.json").read_text())
    assert report["artifacts"][0]["fidelity"]["cosine_mean"] > 0.9999
    assert "Swappable adapters" in (d / "report.md").read_text()


def test_prompt_tuning_matches_peft_forward(encoder, memo_tsv):
    """The edgelm wrapper's in-graph prompt equals peft's own PeftModelForSequenceClassification (cls pooling)."""
    from edgelm.compress.train import load_classifier

    torch.manual_seed(0)
    wrapper, hf, _ = load_classifier(encoder, ["0", "1"], pooling="cls")
    pm = attach_peft(wrapper, hf, AdaptConfig(method="prompt-tuning", num_virtual_tokens=5).resolved())
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    wrapper.eval()
    pm.eval()
    ids, mask = _feeds()
    ours = _torch(wrapper, ids, mask)
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    plain = wrapper.prompt_source
    wrapper.prompt_source = None
    assert np.abs(_torch(wrapper, ids, mask) - ours).max() > 1e-4  # the prompt matters
    wrapper.prompt_source = plain


@pytest.mark.parametrize("method", ["prompt-tuning", "scaled-prompt-tuning"])
def test_prompt_tuned_export_matches_pytorch(encoder, memo_tsv, tmp_path, method):
    res = run_adapt(
        encoder,
        memo_tsv,
        tmp_path / "pt",
        AdaptConfig(method=method, shots=8, epochs=4, seq_len=32, num_virtual_tokens=6),
    )
    hidden = 64
    assert res.trainable_parameters == 6 * hidden + (hidden if method.startswith("scaled") else 0) + (hidden * 2 + 2)
    loaded = load_model(res.out)
    assert tuple(loaded.module.prompt.shape) == (6, hidden)
    assert loaded.max_positions == 128 - 6
    ids, mask = _feeds(seq=24)
    ref = _torch(loaded.module, ids, mask)
    for fmt in ("onnx", "executorch", "tflite"):
        art = exporters.get(fmt).export(
            loaded.module,
            _example(32),
            QuantSpec("fp32"),
            tmp_path / f"m{exporters.suffix(fmt)}",
            exporters.ExportOptions(output_name="logits"),
        )
        assert [t.name for t in art.inputs] == ["input_ids", "attention_mask"]
        out = next(iter(exporters.load(art.path).run({"input_ids": ids, "attention_mask": mask}).values()))
        assert np.abs(out - ref).max() < 1e-4, fmt


def test_scaled_prompt_starts_at_vocabulary_scale(encoder):
    from edgelm.compress.train import load_classifier

    torch.manual_seed(0)
    wrapper, hf, _ = load_classifier(encoder, ["0", "1"], pooling="mean")
    attach_peft(wrapper, hf, AdaptConfig(method="scaled-prompt-tuning", num_virtual_tokens=8).resolved())
    with torch.no_grad():
        prompt = wrapper.prompt_embeddings()
    vocab_std = float(wrapper.base.embeddings.word_embeddings.weight.std())
    assert abs(float(prompt.std()) / vocab_std - 1.0) < 0.05  # raw peft init is N(0, 1), 50x larger here
    assert wrapper.prompt_source.scale.requires_grad


# ---------------------------------------------------------------- hypernetwork


def test_hypernetwork_output_shapes_fit_the_target_layers(encoder):
    from edgelm.adapt.hypernet import build_hypernetwork, target_layers
    from edgelm.compress.train import load_classifier

    wrapper, _, _ = load_classifier(encoder, ["0", "1"], pooling="mean")
    layers = target_layers(wrapper.base)
    assert [p for p, _ in layers][:6] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    ]
    shapes = [tuple(m.weight.shape) for _, m in layers]
    hn = build_hypernetwork(64, shapes, rank=4, task_dim=16)
    feats, labels = torch.randn(10, 64), torch.tensor([0, 1, 2] * 3 + [0])
    a, b = hn(feats, labels)
    assert [tuple(x.shape) for x in a] == [(4, d_in) for _, d_in in shapes]
    assert [tuple(x.shape) for x in b] == [(d_out, 4) for d_out, _ in shapes]
    assert (
        max(float((bb @ aa).abs().max()) for aa, bb in zip(a, b, strict=False)) == 0.0
    )  # zero-initialised mixing: ΔW = 0
    with torch.no_grad():
        hn.mix.normal_()
    a, b = hn(feats, labels)
    assert min(float(torch.linalg.matrix_rank(bb @ aa)) for aa, bb in zip(a, b, strict=False)) <= 4
    assert max(float((bb @ aa).abs().max()) for aa, bb in zip(a, b, strict=False)) > 0
    # the task code ignores the order of demonstrations
    perm = torch.randperm(10)
    assert torch.allclose(hn.task_code(feats, labels), hn.task_code(feats[perm], labels[perm]), atol=1e-6)


@pytest.fixture(scope="module")
def hypernet(tmp_path_factory, encoder):
    if not (SHARED_DATA / "cola").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from edgelm.adapt.hypernet import HyperConfig, meta_train

    out = tmp_path_factory.mktemp("hn") / "hn"
    cfg = HyperConfig(episodes=12, per_task=60, seq_len=32, task_dim=16, val_every=4, val_episodes=3, patience=0)
    rec = meta_train(encoder, SHARED_DATA, out, cfg)
    # SST-2 (the evaluation task) and SMS Spam (the meta-validation task) are both held out of meta-training
    assert "sst2" not in rec["tasks"] and "sms_spam" not in rec["tasks"] and len(rec["tasks"]) == 7
    val = rec["validation"]
    assert val["task"] == "sms_spam" and [c["episode"] for c in val["curve"]] == [0, 4, 8, 12]
    assert val["best_accuracy"] == max(c["accuracy"] for c in val["curve"])
    assert val["untrained_accuracy"] == val["curve"][0]["accuracy"] and val["stopped_early_at"] is None
    return out


def test_meta_validation_keeps_the_best_state(hypernet, encoder):
    """The written hypernetwork is the state that scored best on the meta-validation episodes: re-scored on
    them it gives the recorded best accuracy (and the untrained one if episode 0 won: no update at all)."""
    import numpy as np

    from edgelm.adapt.hypernet import (
        HyperConfig,
        _episode_logits,
        _GeneratedLoRA,
        _validation,
        backbone_wrapper,
        load_hypernetwork,
    )
    from edgelm.data import load_tokenizer

    hn, rec = load_hypernetwork(hypernet)
    cfg = HyperConfig(**{**rec["config"], "shots": tuple(rec["config"]["shots"]), "tasks": ()})
    wrapper, loaded = backbone_wrapper(encoder)
    task, episodes = _validation(SHARED_DATA, cfg, load_tokenizer(loaded.tokenizer_dir, cfg.seq_len))
    lora = _GeneratedLoRA(wrapper.base)
    with torch.no_grad():
        scores = [_episode_logits(wrapper, lora, hn, task, ep) for ep in episodes]
    lora.remove()
    acc = float(np.mean([(lg.argmax(-1) == y).float().mean() for lg, y in scores]) * 100)
    assert abs(acc - rec["validation"]["best_accuracy"]) < 1e-4
    if rec["validation"]["best_episode"] == 0:
        assert float(hn.mix.abs().max()) == 0.0


def test_meta_training_refuses_the_held_out_tasks(encoder, tmp_path):
    from edgelm.adapt.hypernet import HyperConfig, meta_train
    from edgelm.errors import RecipeError

    for tasks, what in ((("cola", "sms_spam"), "meta-validation"), (("cola", "sst2"), "held-out")):
        with pytest.raises(RecipeError, match=what):
            meta_train(encoder, SHARED_DATA, tmp_path / "hn", HyperConfig(episodes=1, tasks=tasks))
    assert not (tmp_path / "hn").exists()


def test_hypernetwork_initialised_lora_steps(hypernet, memo_tsv, tmp_path):
    """`adapt --hypernetwork --steps N`: the generated LoRA and prototype head are the starting point of N LoRA
    steps on the demonstrations; they fit the (memorise-only) demonstrations far better than the start, and the
    unmerged adapter still equals the merged checkpoint."""
    args = ["adapt", "--hypernetwork", str(hypernet), "--demos", str(memo_tsv), "--eval", str(memo_tsv)]
    r0 = runner.invoke(app, [*args, "--out", str(tmp_path / "s0")])
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "s200"), "--steps", "200", "--lr", "1e-2"])
    assert r.exit_code == 0, r.output
    assert "then 200 LoRA steps" in r.output
    rec = json.loads((tmp_path / "s200" / "edgelm_adapt.json").read_text())
    assert rec["steps"] == 200 and rec["train_seconds"] > 0 and rec["adapt_seconds"] > rec["generate_seconds"]
    acc = [float(re.search(r"accuracy on .*?: ([\d.]+)%", x).group(1)) for x in (r0.output, r.output)]
    assert acc[1] > 95 and acc[1] > acc[0], acc  # the steps memorise the demonstrations; the start does not
    m = load_model(tmp_path / "s200")
    merged = _torch(m.module, *_feeds())  # logits of about ±10: float32 merge rounding stays below 1e-5 relative
    assert (
        np.abs(_torch(load_unmerged(tmp_path / "s200").module, *_feeds()) - merged).max() < 1e-5 * np.abs(merged).max()
    )
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--steps", "-1"])
    assert bad.exit_code == 2 and "--steps must be 0 or more" in bad.output and not (tmp_path / "bad").exists()


def test_fit_stops_at_max_steps(encoder, memo_tsv):
    """TrainConfig.max_steps stops inside an epoch; the schedule spans the steps that run."""
    from edgelm.compress.train import TrainConfig, encode_labeled, fit, load_classifier
    from edgelm.data import load_dataset, load_tokenizer

    wrapper, _, loaded = load_classifier(encoder, ["0", "1"])
    train, _ = encode_labeled(load_tokenizer(loaded.tokenizer_dir, 32), load_dataset(memo_tsv), ["0", "1"])
    seen = []
    res = fit(
        wrapper, train, None, TrainConfig(epochs=5, batch_size=8, max_steps=13), progress=lambda *a: seen.append(a)
    )
    assert [a[1] for a in seen] == list(range(1, 14)) and {a[2] for a in seen} == {13}
    assert [e.epoch for e in res.history] == [1, 2]  # 10 steps per epoch: the second epoch stops after 3


def test_adapt_with_hypernetwork_is_deterministic_and_exports(hypernet, memo_tsv, tmp_path):
    r1 = runner.invoke(
        app,
        [
            "adapt",
            "--hypernetwork",
            str(hypernet),
            "--demos",
            str(memo_tsv),
            "--out",
            str(tmp_path / "a1"),
            "--eval",
            str(memo_tsv),
        ],
    )
    assert r1.exit_code == 0, r1.output
    assert "no gradient steps" in r1.output and "accuracy on" in r1.output
    r2 = runner.invoke(
        app, ["adapt", "--hypernetwork", str(hypernet), "--demos", str(memo_tsv), "--out", str(tmp_path / "a2")]
    )
    assert r2.exit_code == 0, r2.output
    b1 = (tmp_path / "a1" / "model.safetensors").read_bytes()
    assert b1 == (tmp_path / "a2" / "model.safetensors").read_bytes()
    m = load_model(tmp_path / "a1")
    assert m.kind == "classifier" and m.labels == ["0", "1"] and m.module.pooling == "mean-l2"
    # the head is the prototype rule: weight 2τP_c, bias -τ|P_c|² -> bias = -|w|² / (4τ)
    rec = json.loads((tmp_path / "a1" / "edgelm_adapt.json").read_text())
    w, b = m.module.model.classifier.weight.detach(), m.module.model.classifier.bias.detach()
    assert torch.allclose(b, -(w * w).sum(-1) / (4 * rec["tau"]), rtol=1e-4)
    assert np.abs(_torch(load_unmerged(tmp_path / "a1").module, *_feeds()) - _torch(m.module, *_feeds())).max() < 1e-5


def test_bad_demonstrations_are_refused(hypernet, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("sentence\tlabel\na good film\t1\nanother good one\t1\n")
    r = runner.invoke(
        app, ["adapt", "--hypernetwork", str(hypernet), "--demos", str(one), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "only one class" in r.output
    nolab = tmp_path / "nolab.tsv"
    nolab.write_text("sentence\na good film\na bad film\n")
    r = runner.invoke(
        app, ["adapt", "--hypernetwork", str(hypernet), "--demos", str(nolab), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "no label column" in r.output
    r = runner.invoke(
        app, ["adapt", "--hypernetwork", str(tmp_path), "--demos", str(nolab), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "hypernet train" in r.output
    assert not (tmp_path / "o").exists()


def test_adapt_cli_few_shot_and_errors(encoder, memo_tsv, tmp_path):
    r = runner.invoke(
        app,
        [
            "adapt",
            "-m",
            str(encoder),
            "--data",
            str(memo_tsv),
            "--method",
            "lora",
            "--shots",
            "4",
            "--epochs",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "l"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "8 examples" in r.output
    r = runner.invoke(
        app, ["adapt", "-m", str(encoder), "--data", str(memo_tsv), "--shots", "50", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "fewer than --shots 50" in r.output
    r = runner.invoke(
        app, ["adapt", "-m", str(encoder), "--data", str(memo_tsv), "--method", "ia3", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "unknown adaptation method" in r.output
    assert not (tmp_path / "x").exists()
