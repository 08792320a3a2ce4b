"""The on-target checks, one test per check and artifact. The values and limits behind each come from
:func:`edgelm.validate.bundle.evaluate` (the same numbers validation.json and report.md show)."""

from __future__ import annotations

import pytest


def _assert_check(record: dict, artifact: str, check: str, absent: str) -> None:
    """Skip what the runner skipped or what does not apply (``absent``); fail what did not run."""
    a = record["artifacts"][artifact]
    if a["status"] == "skipped":
        pytest.skip(a["skipped"])
    ran = a["checks"].get("ran")
    if check != "ran" and ran is not None and not ran["passed"]:
        pytest.fail(f"{artifact} did not run on {record['runner']}: {ran['detail']}", pytrace=False)
    c = a["checks"].get(check)
    if c is None:
        pytest.skip(absent)
    assert c["passed"], f"{artifact} on {record['runner']}: {check}: {c['detail']}"


def test_golden_set_matches_manifest(record):
    assert record["checks"]["golden_sha256"]["passed"], record["checks"]["golden_sha256"]["detail"]


def test_adapter_files_match_manifest(record):
    c = record["checks"].get("adapters_sha256")
    if c is None:
        pytest.skip("the bundle has no further swappable adapters")
    assert c["passed"], c["detail"]


def test_runner_did_not_drop(record):
    assert not record.get("dropped"), f"{record['runner']} dropped: {record['dropped']}"


def test_artifact_sha256_matches_manifest(record, artifact):
    c = record["artifacts"][artifact]["checks"]["sha256"]
    assert c["passed"], f"{artifact}: {c['detail']}"


def test_artifact_runs_on_target(record, artifact):
    _assert_check(record, artifact, "ran", "")


def test_golden_outputs_within_tolerance(record, artifact):
    _assert_check(record, artifact, "golden", "no golden comparison")


def test_task_accuracy_within_gate(record, artifact):
    _assert_check(record, artifact, "accuracy", "the golden set has no labels (export with a labeled --data)")


def test_eval_set_accuracy(record, artifact):
    _assert_check(record, artifact, "eval_accuracy", "no --data eval set was run")


def test_latency_recorded(record, artifact):
    _assert_check(record, artifact, "latency", "no latency")
