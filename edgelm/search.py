"""Accuracy-budget search: pick a pruning ratio and a quantization scheme per format that fit the device's
budgets, measured on the target runtime.

Candidates are every (sparsity, scheme) pair the format can do, where schemes include ``int8_static`` with
more layer groups kept float. Each is first costed by the cost model (:mod:`edgelm.compress.estimate`);
those over the size, latency or RAM budget by estimate are skipped without export. The rest are tried
fastest first — so each next try backs off: less sparsity, more layers in float, 8-bit instead of 4-bit —
exported, run on the runner, and accepted when the accuracy drop against the fp32 model is within
``max_accuracy_drop`` and every other gate passes. The search stops at the first accepted candidate or when
its time limit is reached, and says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgelm import schemes
from edgelm.errors import BudgetError
from edgelm.recipe import SEARCH_SPARSITIES
from exporters import QuantSpec


@dataclass
class Candidate:
    """One (format, sparsity, quantization) to try, with its cost-model estimate and, once tried, results."""

    format: str
    sparsity: float
    quant: QuantSpec
    estimate: dict = field(default_factory=dict)
    status: str = "not tried"
    accuracy: float | None = None
    accuracy_drop: float | None = None
    size_mb: float | None = None
    result: Any = None
    artifact: Any = None
    placement: dict | None = None
    seconds: float | None = None

    @property
    def label(self) -> str:
        return self.quant.label

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "sparsity": self.sparsity,
            "scheme": self.quant.scheme,
            "float_layers": list(self.quant.float_layers),
            "label": self.label,
            "est_latency_ms": self.estimate.get("latency_ms"),
            "est_peak_ram_mb": self.estimate.get("peak_ram_mb"),
            "est_weight_mb": self.estimate.get("weight_mb"),
            "size_mb": self.size_mb,
            "accuracy": self.accuracy,
            "accuracy_drop": self.accuracy_drop,
            "status": self.status,
            "ran_on": self.placement,
            "seconds": self.seconds,
        }


def candidates(
    fmt: str, supported: tuple[str, ...], max_sparsity: float, sparsities: tuple[float, ...] = SEARCH_SPARSITIES
) -> list[Candidate]:
    """All candidates for one format: sparsities up to ``max_sparsity`` (0 always) × the schemes of
    :func:`edgelm.schemes.search_ladder` in ``supported``."""
    out = []
    for s in sorted({x for x in sparsities if x <= max_sparsity + 1e-9} | {0.0}, reverse=True):
        for scheme, float_layers in schemes.search_ladder():
            if scheme in supported:
                out.append(Candidate(fmt, s, schemes.quant_spec(scheme, float_layers)))
    return out


def run_search(
    cands: list[Candidate],
    *,
    estimate: Callable[[Candidate], dict],
    evaluate: Callable[[Candidate], None],
    max_accuracy_drop: float,
    max_size_mb: float,
    target_latency_ms: float,
    max_peak_ram_mb: float,
    time_limit_s: float,
    clock: Callable[[], float] = time.perf_counter,
    evaluate_batch: Callable[[list[Candidate]], None] | None = None,
    batch: int = 1,
) -> tuple[Candidate, dict]:
    """Search one format's candidates. ``estimate(c)`` returns the cost model's dict; ``evaluate(c)`` exports
    and validates ``c``, filling ``c.accuracy``, ``c.accuracy_drop``, ``c.size_mb`` and ``c.result`` (whose
    ``.passed`` says whether every gate passed).

    The candidates within the estimated budgets are tried in cost order (fastest first) and the first that
    passes is chosen. With ``evaluate_batch`` (e.g. Ray tasks) they are tried ``batch`` at a time, in the same
    order; the first passing one of the first batch that has one is chosen: the same candidate as one at a
    time, since every one before it was tried and rejected. Those after it in its batch were tried for
    nothing ("tried in parallel, not needed").

    Returns ``(chosen, summary)``; summary holds every candidate as a row.
    Raises:
        BudgetError: no candidate fits (the message names the closest one tried and by how much it missed),
            or the time limit was reached before any fitted.
    """
    start = clock()
    for c in cands:
        c.estimate = estimate(c)
    cands.sort(key=lambda c: (c.estimate["latency_ms"], c.estimate["weight_mb"], -c.sparsity))
    chosen = None
    limit_reached = False
    affordable = []
    for c in cands:
        e = c.estimate
        over = [
            name
            for name, value, limit in (
                ("size", e["weight_mb"], max_size_mb),
                ("latency", e["latency_ms"], target_latency_ms),
                ("peak RAM", e["peak_ram_mb"], max_peak_ram_mb),
            )
            if value > limit
        ]
        if over:
            c.status = f"skipped: estimated {', '.join(over)} over budget"
        else:
            affordable.append(c)
    step = max(1, batch) if evaluate_batch is not None else 1
    for k in range(0, len(affordable), step):
        if chosen is not None:
            break
        wave = affordable[k : k + step]
        if clock() - start > time_limit_s:
            for c in affordable[k:]:
                c.status = "not tried: time limit reached"
            limit_reached = True
            break
        if evaluate_batch is not None:
            evaluate_batch(wave)
        else:
            t0 = time.perf_counter()  # not ``clock``: an injected clock measures the time limit only
            evaluate(wave[0])
            wave[0].seconds = time.perf_counter() - t0
        for c in wave:
            if chosen is not None:
                c.status = "tried in parallel, not needed: an earlier candidate fits"
            elif c.result is not None and getattr(c.result, "passed", False):
                c.status = "chosen"
                chosen = c
            else:
                why = getattr(c.result, "error", None) or _failed_gates(c.result)
                c.status = f"rejected: {why}"
    summary = {
        "format": cands[0].format if cands else None,
        "candidates": [c.to_dict() for c in cands],
        "time_limit_s": time_limit_s,
        "time_limit_reached": limit_reached,
        "seconds": clock() - start,
        "max_accuracy_drop": max_accuracy_drop,
        "max_size_mb": max_size_mb,
        "target_latency_ms": target_latency_ms,
        "max_peak_ram_mb": max_peak_ram_mb,
    }
    if chosen is None:
        tried = [c for c in cands if c.accuracy_drop is not None]
        fmt = cands[0].format if cands else "?"
        if tried:
            best = min(tried, key=lambda c: c.accuracy_drop)
            closest = (
                f"closest: {best.sparsity:.0%} pruned, {best.label}, accuracy drop {best.accuracy_drop:.2f} "
                f"points (budget {max_accuracy_drop}), {best.status}"
            )
        elif cands:
            best = min(
                cands,
                key=lambda c: max(
                    c.estimate["weight_mb"] / max_size_mb,
                    c.estimate["latency_ms"] / target_latency_ms,
                    c.estimate["peak_ram_mb"] / max_peak_ram_mb,
                ),
            )
            e = best.estimate
            closest = (
                f"closest: {best.sparsity:.0%} pruned, {best.label}, estimated {e['weight_mb']:.1f} MB, "
                f"{e['latency_ms']:.1f} ms, {e['peak_ram_mb']:.0f} MB RAM against budgets of {max_size_mb:g} MB, "
                f"{target_latency_ms:g} ms, {max_peak_ram_mb:g} MB ({best.status})"
            )
        else:
            closest = "the format has no candidate scheme"
        more = " (the time limit was reached: raise --search-time)" if limit_reached else ""
        raise BudgetError(
            f"no {fmt} candidate fits the budgets{more}; {closest}. Loosen the budget "
            "(--max-accuracy-drop, the profile's [budgets]) or train the model longer"
        )
    return chosen, summary


def _failed_gates(result: Any) -> str:
    gates = getattr(result, "gates", {}) or {}
    failed = [f"{k} {v['value']:.4g} vs {v['limit']:.4g}" for k, v in gates.items() if not v["passed"]]
    return ", ".join(failed) or "failed"
