"""Fidelity and accuracy metrics between an artifact's outputs and the PyTorch fp32 reference (numpy only)."""

from __future__ import annotations

import numpy as np

from edgelm import tasks


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` (float [N, D] each) -> float64 [N]."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def top1_agreement(pred: np.ndarray, ref: np.ndarray) -> float:
    """Share of rows (in [0, 1]) whose arg-max over the last axis is the same in ``pred`` and ``ref`` [N, C]."""
    return float((np.argmax(pred, axis=-1) == np.argmax(ref, axis=-1)).mean())


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy in percent (0-100) of arg-max of ``logits`` [N, C] against int ``labels`` [N]."""
    return float((np.argmax(logits, axis=-1) == labels).mean() * 100.0)


def snr_db(pred: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio of ``pred`` against ``ref`` in dB: 10·log10(Σref² / Σ(pred-ref)²)."""
    noise = float(((np.asarray(pred, np.float64) - ref) ** 2).sum())
    signal = float((np.asarray(ref, np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / mean / min of latency samples in ms."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
    }


def fidelity(
    pred: np.ndarray,
    ref: np.ndarray,
    kind: str,
    labels: np.ndarray | None = None,
    baseline_accuracy: float | None = None,
) -> dict:
    """All fidelity numbers for one artifact.

    Args:
        pred, ref: float32 [N, D] (embeddings) or [N, C] (logits).
        kind: ``"embedding"`` or ``"classifier"``.
        labels: int64 [N] task labels (classifiers), or None.
        baseline_accuracy: the accuracy (%) the drop is measured against, when it is not ``ref``'s own (a
            pruned model's artifact is compared with the pruned model, its accuracy with the unpruned one).
    Returns:
        ``cosine_mean``, ``cosine_min``, ``max_abs_error``, ``snr_db``; for classifiers also
        ``top1_agreement`` (0-1) and, with labels, ``accuracy`` and ``reference_accuracy`` (percent) and
        ``accuracy_drop`` (points).
    """
    cos = cosine_rows(pred, ref)
    out = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_error": float(np.abs(np.asarray(pred, np.float64) - ref).max()),
        "snr_db": snr_db(pred, ref),
    }
    if tasks.for_kind(kind).uses_labels:
        out["top1_agreement"] = top1_agreement(pred, ref)
        if labels is not None:
            out["accuracy"] = accuracy(pred, labels)
            out["reference_accuracy"] = accuracy(ref, labels) if baseline_accuracy is None else float(baseline_accuracy)
            out["accuracy_drop"] = out["reference_accuracy"] - out["accuracy"]
    return out
