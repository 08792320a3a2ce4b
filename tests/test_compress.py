"""Fine-tuning, structured pruning, distillation and the cost model on tiny models."""

import copy
import itertools
import json

import numpy as np
import pytest
import torch

import exporters
from edgelm.compress import pruning
from edgelm.compress.estimate import estimate
from edgelm.compress.jobs import run_compress, run_finetune
from edgelm.compress.sage import Sage
from edgelm.compress.train import (
    DistillConfig,
    TrainConfig,
    accuracy,
    distillation_loss,
    encode_labeled,
    fit,
    layer_map,
    teacher_copy,
)
from edgelm.data import load_dataset, load_tokenizer
from edgelm.errors import DataError, ModelError, RecipeError
from edgelm.models import load_model
from edgelm.profiles import load_profile
from edgelm.recipe import make_recipe

SEQ = 32


def _data(loaded, path):
    tok = load_tokenizer(loaded.tokenizer_dir, SEQ)
    return encode_labeled(tok, load_dataset(path), loaded.labels)[0]


def _logits(wrapper, ids, mask):
    with torch.no_grad():
        return wrapper.eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def test_finetune_learns_and_is_deterministic(trained_classifier, memo_tsv, tmp_path):
    meta = json.loads((trained_classifier / "edgelm_training.json").read_text())
    history = meta["result"]["history"]
    assert history[0]["eval_accuracy"] <= 60 and meta["result"]["best_accuracy"] >= 95  # it learned the task
    assert meta["result"]["best_epoch"] == max(range(1, 9), key=lambda e: (history[e - 1]["eval_accuracy"], e))
    # a plain Hugging Face user can load the checkpoint
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(trained_classifier)
    assert hf.config.num_labels == 2 and hf.config.id2label[1] == "1"
    # same seed, same data -> same weights
    base = meta["base_model"]
    a = run_finetune(base, memo_tsv, tmp_path / "a", cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8, seq_len=SEQ))
    b = run_finetune(base, memo_tsv, tmp_path / "b", cfg=TrainConfig(epochs=1, lr=1e-3, batch_size=8, seq_len=SEQ))
    assert a.history[0].train_loss == b.history[0].train_loss
    wa, wb = load_model(tmp_path / "a").module, load_model(tmp_path / "b").module
    assert all(torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values(), strict=False))


def test_sage_scales_steps_by_sensitivity():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([1.0, 0.01]))
    opt = Sage([w], lr=0.1, weight_decay=0.0)
    target = torch.tensor([0.0, 1.0])
    losses = []
    for _ in range(30):
        loss = ((w - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    state = opt.state[w]
    assert state["ibar"].shape == w.shape and float(state["ubar"].sum()) > 0


def test_pruning_removes_what_it_says(trained_classifier):
    loaded = load_model(trained_classifier)
    wrapper = loaded.module
    heads, neurons = pruning.structure_counts(wrapper)
    assert heads == [2, 2] and neurons == [128, 128]
    before = pruning.encoder_parameter_count(wrapper)
    record = pruning.prune_one_shot(wrapper, 0.5)
    heads, neurons = pruning.structure_counts(wrapper)
    assert sum(heads) == 2 and all(h >= 1 for h in heads)
    assert abs(sum(neurons) - 128) <= 32 and all(n % 32 == 0 for n in neurons)  # aligned for int4 groups
    d, dh = 64, 32
    # q,k,v: d*(h*dh)+h*dh each; attention out: (h*dh)*d + d; FFN in: d*n + n; FFN out: n*d + d; 2 LayerNorms: 4d
    expected = sum(
        3 * (d * h * dh + h * dh) + (h * dh * d + d) + (d * n + n) + (n * d + d) + 4 * d
        for h, n in zip(heads, neurons, strict=False)
    )
    assert pruning.encoder_parameter_count(wrapper) == expected < before
    layer = pruning.encoder_layers(wrapper)[0]
    assert layer.attention.self.query.weight.shape == (heads[0] * dh, d)
    assert layer.output.dense.weight.shape == (d, neurons[0])
    assert record["intermediate_sizes"] == neurons and [len(h) for h in record["heads"]] == heads


def test_masked_model_equals_removed_model(trained_classifier, memo_tsv):
    loaded = load_model(trained_classifier)
    ids, mask, _ = _data(loaded, memo_tsv)
    masks = pruning.select(*pruning.magnitude_scores(loaded.module), 0.5, head_size=32)
    pruning.apply_masks(loaded.module, masks)
    masked = _logits(loaded.module, ids, mask)
    pruning.remove_structures(loaded.module, masks)
    np.testing.assert_allclose(_logits(loaded.module, ids, mask), masked, atol=1e-5)


@pytest.fixture(scope="module")
def pruned_ckpt(trained_classifier, memo_tsv, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "p"
    result, summary = run_compress(
        trained_classifier,
        memo_tsv,
        out,
        sparsity=0.5,
        method="platon",
        distill=True,
        eval_data=memo_tsv,
        cfg=TrainConfig(epochs=2, lr=1e-3, batch_size=8, seq_len=SEQ),
    )
    return out, result, summary


def test_platon_prunes_during_training_and_saves(pruned_ckpt, memo_tsv):
    out, result, summary = pruned_ckpt
    assert summary["encoder_parameters_after"] < 0.75 * summary["encoder_parameters_before"]
    assert [e.neuron_sparsity for e in result.history][-1] == pytest.approx(0.5, abs=0.01)
    assert result.history[0].neuron_sparsity <= result.history[-1].neuron_sparsity
    reloaded = load_model(out)  # edgelm rebuilds the pruned shapes from config.json
    assert pruning.structure_counts(reloaded.module) == (summary["heads_per_layer"], summary["ffn_neurons_per_layer"])
    ids, mask, labels = _data(reloaded, memo_tsv)
    assert accuracy(reloaded.module, ids, mask, labels) == pytest.approx(summary["accuracy_after"], abs=3.0)


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
def test_pruned_model_exports_and_matches(pruned_ckpt, memo_tsv, tmp_path, fmt):
    loaded = load_model(pruned_ckpt[0])
    ids, mask, _ = _data(loaded, memo_tsv)
    ids, mask = ids[:12], mask[:12]
    example = {
        "input_ids": torch.ones(1, SEQ, dtype=torch.int64),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
    }
    art = exporters.get(fmt).export(
        loaded.module,
        example,
        exporters.QuantSpec("fp32"),
        tmp_path / f"m{exporters.suffix(fmt)}",
        exporters.ExportOptions(output_name="logits"),
    )
    out = next(iter(exporters.load(art.path).run({"input_ids": ids, "attention_mask": mask}).values()))
    np.testing.assert_allclose(out, _logits(loaded.module, ids, mask), atol=1e-4)


def test_distillation_lowers_the_students_loss(trained_classifier, memo_tsv):
    loaded = load_model(trained_classifier)
    ids, mask, labels = _data(loaded, memo_tsv)
    teacher = teacher_copy(loaded.module)
    student = copy.deepcopy(loaded.module)
    pruning.prune_one_shot(student, 0.5)
    cfg = DistillConfig()

    def loss():
        x, m, y = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)
        with torch.no_grad():
            s_h, t_h = [], []
            s, _ = student.eval().forward_hidden(x, m, s_h)
            t, _ = teacher.forward_hidden(x, m, t_h)
            return float(distillation_loss(s, t, y, s_h, t_h, m, cfg))

    before = loss()
    fit(student, (ids, mask, labels), None, TrainConfig(epochs=3, lr=1e-3, batch_size=8, seq_len=SEQ), teacher=teacher)
    assert loss() < 0.8 * before
    assert layer_map(2, 2) == [(1, 1), (2, 2)] and layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]


def test_cubic_schedule():
    values = [pruning.cubic_sparsity(s, 100, 0.5) for s in range(101)]
    assert values[:10] == [0.0] * 10 and values[80:] == [0.5] * 21
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[20] > 0.5 * (20 - 10) / 70  # cubic: fast at first


def test_estimate_counts(trained_classifier):
    loaded = load_model(trained_classifier)
    profile = make_recipe(load_profile("pixel8"))
    e32 = estimate(loaded.module, profile, scheme="fp32", seq_len=SEQ, threads=1)
    d, n, h, dh, L = 64, 128, 2, 32, 2
    linear = L * SEQ * (3 * d * h * dh + h * dh * d + 2 * d * n) + d * d + d * 2
    attn = L * 2 * SEQ * SEQ * h * dh
    assert e32.macs == linear + attn
    assert e32.parameters == loaded.num_parameters
    assert e32.weight_mb == pytest.approx(loaded.num_parameters * 4 / 1e6)
    e8 = estimate(loaded.module, profile, scheme="int8_dynamic", seq_len=SEQ, threads=1)
    e4 = estimate(loaded.module, profile, scheme="8da4w", seq_len=SEQ, threads=1)
    assert e4.weight_mb < e8.weight_mb < 0.5 * e32.weight_mb and e8.latency_ms < e32.latency_ms
    pruning.prune_one_shot(loaded.module, 0.5)
    assert estimate(loaded.module, profile, scheme="fp32", seq_len=SEQ, threads=1).macs < e32.macs


def test_estimate_uses_the_isa_and_the_format(trained_classifier):
    """int8 runs at the profile's rate with an int8 dot product, at 0.4 of it without one; ONNX's per-token
    int8 path is costed slower than XNNPACK's fused kernels; fp32 does not depend on either."""
    import dataclasses

    from edgelm.compress.estimate import NO_DOT_PRODUCT_SHARE, int8_rate

    loaded = load_model(trained_classifier)
    recipe = make_recipe(load_profile("pixel8"))
    no_dot = dataclasses.replace(recipe, hardware={**recipe.hardware, "isa_features": ["neon", "fp16"]})
    assert int8_rate(recipe.hardware, "executorch") == 240.0
    assert int8_rate(no_dot.hardware, "executorch") == pytest.approx(240.0 * NO_DOT_PRODUCT_SHARE)
    assert int8_rate(recipe.hardware, "onnx") < int8_rate(recipe.hardware, "tflite")

    def cost(r, scheme, fmt):
        return estimate(loaded.module, r, scheme=scheme, fmt=fmt, seq_len=SEQ, threads=1).latency_ms

    assert cost(no_dot, "int8_dynamic", "executorch") > cost(recipe, "int8_dynamic", "executorch")
    assert cost(recipe, "int8_dynamic", "onnx") > cost(recipe, "int8_dynamic", "executorch")
    assert cost(no_dot, "fp32", "executorch") == cost(recipe, "fp32", "executorch")


def test_bad_training_input(tiny_bert, tiny_classifier, tmp_path):
    one_class = tmp_path / "one.tsv"
    one_class.write_text("sentence\tlabel\na good film\t1\nanother good film\t1\n")
    with pytest.raises(DataError, match="only one class"):
        run_finetune(tiny_bert, one_class, tmp_path / "x")
    unlabeled = tmp_path / "u.tsv"
    unlabeled.write_text("sentence\na good film\n")
    with pytest.raises(DataError, match="no label column"):
        run_finetune(tiny_bert, unlabeled, tmp_path / "x")
    with pytest.raises(ModelError, match="not a sequence classifier"):
        run_compress(tiny_bert, one_class, tmp_path / "x")
    with pytest.raises(RecipeError, match="sparsity"):
        run_compress(tiny_classifier, one_class, tmp_path / "x", sparsity=1.5)
    with pytest.raises(RecipeError, match="optimizer"):
        run_finetune(tiny_bert, one_class, tmp_path / "x", cfg=TrainConfig(optimizer="sgd"))
    assert not (tmp_path / "x").exists()
