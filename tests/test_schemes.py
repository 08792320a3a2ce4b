"""The scheme table (edgelm.schemes): one row per scheme, asked by every module that needs it."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm import schemes
from edgelm.errors import RecipeError
from edgelm.search import candidates
from exporters.base import SCHEMES


def test_table_has_every_scheme_the_exporters_know():
    assert schemes.names() == list(SCHEMES)


def test_search_ladder_is_most_aggressive_first():
    assert schemes.search_ladder() == [
        ("8da4w", ()),
        ("int8_static", ("ffn_output", "head")),
        ("int8_static", ("ffn_output", "attention_output", "head")),
        ("int8_dynamic", ()),
        ("fp16", ()),
        ("fp32", ()),
    ]
    # a format without int8_static gets the ladder without it, and int4_weight_only is never searched
    labels = [c.label for c in candidates("tflite", ("fp32", "fp16", "int8_dynamic", "8da4w"), 0.0)]
    assert labels == ["8da4w", "int8_dynamic", "fp16", "fp32"]


def test_quant_spec_follows_the_row():
    q = schemes.quant_spec("int8_static")
    assert (q.embedding_bits, q.float_layers, q.per_channel) == (8, ("ffn_output", "head"), True)
    assert schemes.quant_spec("fp16").embedding_bits is None
    assert schemes.quant_spec("8da4w", ()).float_layers == ()


def test_golden_tolerance_comes_from_the_table():
    ref = np.array([[2.0, -4.0]], dtype=np.float32)
    assert schemes.golden_max_abs_error("int8_dynamic", ref) == pytest.approx(1.0)  # 0.25 x 4
    assert schemes.golden_max_abs_error("fp32", ref) == pytest.approx(4e-3)


def test_unknown_scheme_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown quantization scheme 'int3'; choose from fp32"):
        schemes.get("int3")
