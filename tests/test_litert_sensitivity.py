"""The arithmetic of ``benchmarks/litert_int8_sensitivity.py``: its simulated int8 rounding and SmoothQuant's
rescaling, which must leave the float model unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import litert_int8_sensitivity as sens
finally:
    sys.path.pop(0)


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


def test_smoothquant_rescaling_leaves_the_float_model_unchanged():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        v = model.model.layers[0].self_attn.v_proj.weight.clone()
    sens.smooth(model, np.random.default_rng(0).integers(0, 64, (2, 16)), 0.5, 4, 2)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(v, model.model.layers[0].self_attn.v_proj.weight)
    assert (after - before).abs().max() < 1e-4
