"""Tasks declared in one place (edgelm.tasks) and the one gate check every path uses."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm import tasks
from edgelm.errors import ModelError
from edgelm.recipe import Gates


def test_task_from_checkpoint_architecture():
    assert tasks.for_architectures(["BertForSequenceClassification"]) is tasks.TEXT_CLASSIFICATION
    assert tasks.for_architectures(["BertModel"]) is tasks.FEATURE_EXTRACTION
    assert tasks.for_architectures([]) is tasks.FEATURE_EXTRACTION
    assert tasks.for_kind("classifier").output_name == "logits"
    assert tasks.for_architectures(["LlamaForCausalLM"]) is tasks.TEXT_GENERATION
    assert tasks.for_kind("generator") is tasks.TEXT_GENERATION
    with pytest.raises(ModelError, match="unknown model kind 'decoder'"):
        tasks.for_kind("decoder")


def test_gate_checks_follow_the_task():
    gates = Gates(min_cosine=0.99, min_top1_agreement=0.95, max_accuracy_drop=1.0, max_size_mb=10.0)
    ref = np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32)  # largest |value| 2, range 3
    fid = {
        "cosine_mean": 0.995,
        "max_abs_error": 0.4,
        "top1_agreement": 0.90,
        "accuracy": 80.0,
        "reference_accuracy": 82.5,
        "accuracy_drop": 2.5,
    }
    c = tasks.gate_checks(tasks.TEXT_CLASSIFICATION, fid, gates, "int8_dynamic", ref, size_mb=12.0)
    # a classifier has no cosine gate: top-1, accuracy drop and the error relative to the logits' range
    assert {k: v["passed"] for k, v in c.items()} == {
        "max_size_mb": False,
        "min_top1_agreement": False,
        "max_abs_error": True,  # 0.4 <= 0.25 x 3 (range)
        "max_accuracy_drop": False,
    }
    assert c["max_abs_error"]["limit"] == pytest.approx(0.75)
    fid_bad_cosine = {**fid, "cosine_mean": 0.2, "top1_agreement": 1.0, "accuracy_drop": 0.0}
    c = tasks.gate_checks(tasks.TEXT_CLASSIFICATION, fid_bad_cosine, gates, "int8_dynamic", ref)
    assert all(v["passed"] for v in c.values())
    # the same numbers for an embedding model: no top-1 or accuracy gate, and fp32's tolerance is tight
    e = tasks.gate_checks(tasks.FEATURE_EXTRACTION, fid, gates, "fp32", ref)
    assert set(e) == {"min_cosine", "max_abs_error"} and not e["max_abs_error"]["passed"]
    assert e["max_abs_error"]["detail"] == "max error 0.4 > 0.002 (fp32)"  # 0.1% of the largest |value| 2
    assert not tasks.gate_checks(tasks.FEATURE_EXTRACTION, {"cosine_mean": float("nan")}, gates, "fp32")["min_cosine"][
        "passed"
    ]
