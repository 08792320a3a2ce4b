"""LiteRT's int8 arithmetic and SmoothQuant: the simulated rounding of ``benchmarks/litert_int8_sensitivity.py``
and SmoothQuant's rescaling (edgelm.compress.smoothquant), which leaves the float model unchanged (the
producers' rows and biases carry the division; grouped-query attention: one scale per KV channel) and shrinks
an outlier channel's error under dynamic int8 activations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgelm.compress import smoothquant  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import litert_int8_sensitivity as sens
finally:
    sys.path.pop(0)

SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2":  # biases on q/k/v: the value projection's bias must be divided with its rows
        cfg = transformers.Qwen2Config(**SIZES, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_(0, 0.5)
        return model
    cfg = transformers.LlamaConfig(**SIZES, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rescaling_leaves_the_float_model_unchanged(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        v = model.model.layers[0].self_attn.v_proj.weight.clone()
        norm = model.model.layers[1].post_attention_layernorm.weight.clone()
    rows = smoothquant.calibration_rows(np.random.default_rng(0).integers(0, 64, 40))
    assert rows.shape == (1, 40)  # fewer tokens than a row: one short row
    assert smoothquant.smooth(model, rows, 0.5) == 8  # 4 rescaled inputs per block
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(v, model.model.layers[0].self_attn.v_proj.weight)
    assert not torch.equal(norm, model.model.layers[1].post_attention_layernorm.weight)
    assert (after - before).abs().max() < 1e-4


def test_calibration_rows_and_bad_alpha():
    rows = smoothquant.calibration_rows(np.arange(1300), max_tokens=1200)
    assert rows.shape == (2, 512) and rows[1, 0] == 512  # whole rows of 512 from the first 1,200 tokens
    with pytest.raises(ValueError, match="at least 2"):
        smoothquant.calibration_rows([5])
    with pytest.raises(ValueError, match=r"alpha is in \(0, 1\]"):
        smoothquant.smooth(tiny("llama"), rows, 0.0)


def test_an_outlier_channel_costs_less_under_dynamic_int8_after_smoothing():
    """One residual channel 40x larger than the rest (moved there without changing the float model: the
    RMSNorm gain up, the q/k/v columns down) dominates each row's int8 scale; after SmoothQuant the simulated
    int8 logits are closer to float."""
    model = tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 40
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, 3] /= 40
    ids = torch.randint(0, 64, (4, 24))

    def error() -> float:
        with torch.no_grad():
            ref = model(ids).logits
            sim = sens.Simulation(model)
            sim.apply(set())
            q = model(ids).logits
            sim.clear()
        return float((q - ref).pow(2).mean() / ref.pow(2).mean())

    before = error()
    smoothquant.smooth(model, np.random.default_rng(1).integers(0, 64, (2, 32)), 0.5)
    assert error() < 0.5 * before


def test_calibration_comes_after_the_perplexity_window_or_from_the_model_itself():
    """The export calibrates on the perplexity text after its window; without 512 tokens there, on 512 tokens
    the model samples from its BOS (never the golden prompts the gates check)."""
    from edgelm.causal_lm import CausalLM
    from edgelm.generative import _calibration

    model = tiny("llama")
    lm = CausalLM(model, None, "tiny", Path("tiny"), None, "llama", model.config.to_dict())
    rows, source = _calibration(lm, list(range(1500)), Path("wiki.test.raw"))
    assert [r[0] for r in rows] == [0, 512] and source == "1024 tokens of wiki.test.raw after the perplexity window"
    rows, source = _calibration(lm, list(range(100)), Path("short.txt"))
    assert len(rows) == 1 and rows[0].shape == (512,) and rows[0][0] == lm.bos_id
    assert len(set(rows[0].tolist())) > 20 and source == "512 tokens sampled from the model (short.txt is too short)"
    again, _ = _calibration(lm, [], None)
    assert np.array_equal(again[0], rows[0])  # seeded: the same export calibrates the same way


def test_dynamic_row_quantization_rounds_within_half_a_step_and_keeps_zero():
    x = torch.tensor([[0.0, 0.5, -3.0, 7.0, 2.25], [1.0, 2.0, 3.0, 4.0, 5.0]])
    q = sens.quantize_rows(x)
    step = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255
    assert torch.all((q - x).abs() <= step[:, None] / 2 + 1e-6)
    assert q[0, 0] == 0.0 and not torch.equal(q, x)  # zero is exact (the zero point); the rest is rounded
    w = torch.tensor([[0.1, -0.2, 0.4], [10.0, 1.0, -1.0]])
    qw = sens.quantize_weight(w)
    assert torch.allclose(qw[:, 0].abs().max(), torch.tensor(10.0)) and torch.all((qw - w).abs() <= 10 / 254 + 1e-6)
    assert qw[0, 2] == pytest.approx(0.4)  # each row's largest value is exact: one scale per output channel


def test_extra_prompts_are_a_fixed_draw_of_sst2_dev_sentences():
    if not sens.SST2_DEV.is_file():
        pytest.skip("SST-2 dev is not in ../shared/data")
    first = sens.sst2_sentences(5)
    assert first == sens.sst2_sentences(5) and len(set(first)) == 5 and sens.sst2_sentences(0) == []
    assert sens.sst2_sentences(5, seed=1) != first and all(s.strip() for s in first)
