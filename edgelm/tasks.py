"""Tasks: what differs between a sentence-embedding model and a classifier, declared in one place.

A :class:`Task` says which checkpoints it takes, the export wrapper and its output name, whether labels
mean anything to it, what the golden set stores, which metrics and gates judge its artifacts, and whether
it can be pruned (a task accuracy to guard). The pipeline, validation and the report ask the task; adding a
task (``text-generation``) is adding one :class:`Task` here and its wrapper in :mod:`edgelm.models`.

:func:`gate_checks` is the one gate check: the export report, the accuracy-budget search and ``edgelm
validate`` all judge an artifact with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelm import schemes
from edgelm.errors import ModelError

#: Gates by name: what each compares (see :func:`gate_checks`).
GATES = (
    "max_size_mb",
    "min_cosine",
    "min_top1_agreement",
    "max_abs_error",
    "max_accuracy_drop",
    "max_perplexity_ratio",
    "min_token_agreement",
)


@dataclass(frozen=True)
class Task:
    """One task edgelm exports.

    Attributes:
        name: the Hugging Face pipeline name (``"feature-extraction"``, ``"text-classification"``).
        kind: the model kind stored in the manifest (``"embedding"``, ``"classifier"``).
        architecture_suffix: checkpoints whose ``config.json`` architectures end with it take this task
            (``""``: the fallback for any encoder).
        wrapper: the export wrapper in :mod:`edgelm.models` (``forward(input_ids, attention_mask)``).
        output_name: the artifact's output (``"embeddings"`` float32 [batch, hidden], ``"logits"`` float32
            [batch, num_labels]).
        uses_labels: labeled data gives a task accuracy (top-1 agreement, accuracy, accuracy drop).
        prunable: structured pruning and the accuracy-budget search apply (they need a task accuracy).
        golden_keys: arrays the golden set stores beyond the inputs and the reference outputs.
        gates: the gates (:data:`GATES`) that judge this task's artifacts. A sentence embedding is judged by
            its cosine similarity to the PyTorch fp32 reference; a classifier by what its users see (top-1
            agreement with the reference, the task-accuracy drop), not by the cosine of its logits: two-class
            logits near the decision boundary make the cosine swing while no prediction changes.
        error_scale: what ``max_abs_error`` is a share of (:func:`edgelm.schemes.golden_max_abs_error`):
            ``"max_abs"`` the reference's largest |value| (embeddings), ``"range"`` the logits' range, max -
            min over the golden set (classifiers).
    """

    name: str
    kind: str
    architecture_suffix: str
    wrapper: str
    output_name: str
    uses_labels: bool
    prunable: bool
    golden_keys: tuple[str, ...]
    gates: tuple[str, ...]
    error_scale: str


FEATURE_EXTRACTION = Task(
    name="feature-extraction",
    kind="embedding",
    architecture_suffix="",
    wrapper="SentenceEmbedding",
    output_name="embeddings",
    uses_labels=False,
    prunable=False,
    golden_keys=("texts",),
    gates=("max_size_mb", "min_cosine", "max_abs_error"),
    error_scale="max_abs",
)
TEXT_CLASSIFICATION = Task(
    name="text-classification",
    kind="classifier",
    architecture_suffix="ForSequenceClassification",
    wrapper="SequenceClassifier",
    output_name="logits",
    uses_labels=True,
    prunable=True,
    golden_keys=("texts", "labels"),
    gates=("max_size_mb", "min_top1_agreement", "max_abs_error", "max_accuracy_drop"),
    error_scale="range",
)
TEXT_GENERATION = Task(
    name="text-generation",
    kind="generator",
    architecture_suffix="ForCausalLM",
    wrapper="",  # exported by the runtimes' own LLM tooling (exporters.decoder), not an edgelm wrapper
    output_name="logits",
    uses_labels=False,
    prunable=False,
    golden_keys=("prompt_tokens", "reference_tokens", "reference_next_logits", "perplexity_tokens"),
    gates=("max_size_mb", "max_perplexity_ratio", "min_token_agreement"),
    error_scale="range",
)
#: Every task, most specific first (the first whose architecture suffix matches a checkpoint takes it).
TASKS: tuple[Task, ...] = (TEXT_CLASSIFICATION, TEXT_GENERATION, FEATURE_EXTRACTION)


def for_architectures(architectures: list[str]) -> Task:
    """The task of a checkpoint from its ``config.json`` ``architectures`` (``BertForSequenceClassification``
    -> text-classification; any other encoder -> feature-extraction)."""
    for task in TASKS:
        if task.architecture_suffix and any(a.endswith(task.architecture_suffix) for a in architectures):
            return task
    return FEATURE_EXTRACTION


def for_kind(kind: str) -> Task:
    """The task whose model kind is ``kind`` (from a manifest). Raises ModelError for an unknown kind."""
    for task in TASKS:
        if task.kind == kind:
            return task
    raise ModelError(f"unknown model kind {kind!r} (edgelm knows {', '.join(t.kind for t in TASKS)})")


def check(passed: bool, value, limit, detail: str) -> dict:
    """One check's record, as validation.json and the report keep it: ``{"passed", "value", "limit", "detail"}``."""
    return {"passed": bool(passed), "value": value, "limit": limit, "detail": detail}


def max_abs_error(task: Task, scheme: str, reference: np.ndarray) -> float:
    """The largest |artifact - PyTorch fp32| a ``scheme`` artifact of ``task`` may show on ``reference``
    (float32 [N, D]): the scheme's share (:attr:`edgelm.schemes.Scheme.golden_max_rel_error`) of the task's
    :attr:`Task.error_scale`."""
    return schemes.golden_max_abs_error(scheme, reference, relative_to=task.error_scale)


def gate_checks(
    task: Task,
    fidelity: dict,
    gates: object,
    scheme: str,
    reference: np.ndarray | None = None,
    size_mb: float | None = None,
) -> dict[str, dict]:
    """Judge one artifact: ``{gate: {"passed", "value", "limit", "detail"}}`` for each of the task's gates
    that the measurements allow.

    Args:
        fidelity: :func:`edgelm.validate.metrics.fidelity` of the artifact's golden outputs (``cosine_mean``,
            ``max_abs_error``; ``top1_agreement`` and, with labels, ``accuracy_drop`` for classifiers;
            ``perplexity``, ``reference_perplexity``, ``perplexity_ratio``, ``token_agreement``, ``mean_prefix``
            for generators).
        gates: the artifact's gates (``min_cosine``, ``min_top1_agreement``, ``max_accuracy_drop`` points,
            ``max_size_mb`` MB, ``max_perplexity_ratio``, ``min_token_agreement``), a
            :class:`edgelm.recipe.Gates` or the manifest's copy.
        scheme: the quantization scheme; it sets the golden tolerance (:func:`edgelm.schemes.golden_max_abs_error`).
        reference: the PyTorch fp32 golden outputs, float32 [N, D] (for ``max_abs_error``); None skips it.
        size_mb: the artifact's size, MB (10^6 bytes); None skips ``max_size_mb``.
    """
    out: dict[str, dict] = {}
    for name in task.gates:
        if name == "max_size_mb" and size_mb is not None:
            limit = gates.max_size_mb
            out[name] = check(size_mb <= limit, size_mb, limit, f"{size_mb:.2f} MB (budget {limit:g} MB)")
        elif name == "min_cosine" and "cosine_mean" in fidelity:
            v, limit = fidelity["cosine_mean"], gates.min_cosine
            ok = not math.isnan(v) and v >= limit
            out[name] = check(ok, v, limit, f"cosine {v:.4f} {'>=' if ok else '<'} {limit}")
        elif name == "min_top1_agreement" and "top1_agreement" in fidelity:
            v, limit = fidelity["top1_agreement"], gates.min_top1_agreement
            ok = v >= limit
            out[name] = check(ok, v, limit, f"top-1 {v:.3f} {'>=' if ok else '<'} {limit}")
        elif name == "max_abs_error" and reference is not None and "max_abs_error" in fidelity:
            v, limit = fidelity["max_abs_error"], max_abs_error(task, scheme, reference)
            ok = v <= limit
            out[name] = check(ok, v, limit, f"max error {v:.3g} {'<=' if ok else '>'} {limit:.3g} ({scheme})")
        elif name == "max_perplexity_ratio" and fidelity.get("perplexity_ratio") is not None:
            v, limit = fidelity["perplexity_ratio"], gates.max_perplexity_ratio
            ok = not math.isnan(v) and v <= limit
            out[name] = check(
                ok,
                v,
                limit,
                f"perplexity {fidelity['perplexity']:.3f} vs reference {fidelity['reference_perplexity']:.3f}: "
                f"ratio {v:.4f} {'<=' if ok else '>'} {limit}",
            )
        elif name == "min_token_agreement" and "token_agreement" in fidelity:
            v, limit = fidelity["token_agreement"], gates.min_token_agreement
            ok = v >= limit
            out[name] = check(
                ok,
                v,
                limit,
                f"greedy tokens equal on {v:.0%} of prompts {'>=' if ok else '<'} {limit:.0%} "
                f"(first difference after {fidelity.get('mean_prefix', 0):.1f} tokens on average)",
            )
        elif name == "max_accuracy_drop" and "accuracy_drop" in fidelity:
            v, limit = fidelity["accuracy_drop"], gates.max_accuracy_drop
            ok = v <= limit
            out[name] = check(
                ok,
                v,
                limit,
                f"accuracy {fidelity['accuracy']:.2f}% vs PyTorch fp32 {fidelity['reference_accuracy']:.2f}%: "
                f"drop {v:.2f} points {'<=' if ok else '>'} {limit}",
            )
    return out
