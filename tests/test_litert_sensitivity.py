"""The arithmetic of ``benchmarks/litert_int8_sensitivity.py``: its simulated int8 rounding (SmoothQuant's
rescaling, which it also uses, is tested in test_smoothquant.py)."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_extra_prompts_are_a_fixed_draw_of_sst2_dev_sentences():
    if not sens.SST2_DEV.is_file():
        pytest.skip("SST-2 dev is not in ../shared/data")
    first = sens.sst2_sentences(5)
    assert first == sens.sst2_sentences(5) and len(set(first)) == 5 and sens.sst2_sentences(0) == []
    assert sens.sst2_sentences(5, seed=1) != first and all(s.strip() for s in first)
