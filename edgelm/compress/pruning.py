"""Structured pruning of BERT-family encoders: attention heads and FFN intermediate neurons, removed for real.

A *structure* is one attention head (its rows of the query/key/value weights and biases, and its columns of
the attention output projection) or one FFN neuron (its row of ``intermediate.dense`` and its column of
``output.dense``). Pruning happens in two steps that give the same outputs:

1. **Masking** during training: the weights of a pruned structure are set to zero after every optimizer
   step (:func:`apply_masks`). A head whose value rows and bias are zero adds nothing to the attention
   output; a neuron whose input row and bias are zero outputs GELU(0) = 0.
2. **Removal** (:func:`remove_structures`): the Linear layers are sliced with
   ``transformers.pytorch_utils.prune_linear_layer`` (query/key/value and intermediate on dim 0, the
   attention output and FFN output projections on dim 1), so the exported graphs have smaller matmuls and
   fewer heads. transformers 5 has no ``prune_heads``; the kept shapes are written to the checkpoint's
   ``config.json`` under ``edgelm_pruning`` so that :func:`edgelm.models.load_model` can rebuild them.

Importance scores:

- :func:`magnitude_scores`: the L2 norm of a structure's weights (the one-shot baseline).
- :class:`PlatonScorer`: PLATON (Zhang et al., "PLATON: Pruning Large Transformer Models with Upper
  Confidence Bound of Weight Importance", ICML 2022). Per weight, the sensitivity
  ``I = |θ · ∂L/∂θ|`` is smoothed by an exponential moving average ``Ī ← β1 Ī + (1-β1) I`` and its
  uncertainty by ``Û ← β2 Û + (1-β2) |I - Ī|``; the score is ``Ī · Û``, summed over a structure's weights.
  Pruning follows the cubic schedule of :func:`cubic_sparsity` during fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelm.models import CONFIG_KEY, encoder_layers, slice_structures


def structure_counts(wrapper: Any) -> tuple[list[int], list[int]]:
    """``(heads per layer, FFN neurons per layer)`` as they are now."""
    heads, neurons = [], []
    for layer in encoder_layers(wrapper):
        sa = layer.attention.self
        heads.append(sa.query.out_features // sa.attention_head_size)
        neurons.append(layer.intermediate.dense.out_features)
    return heads, neurons


def _head_rows(head: int, size: int) -> slice:
    return slice(head * size, (head + 1) * size)


def structure_params(layer: Any) -> dict[str, list[tuple[Any, int]]]:
    """The weights of one layer's structures: ``{"heads": [(param, axis)...], "neurons": [...]}``; ``axis``
    is the dimension along which a structure's slice lies (0: output rows, 1: input columns)."""
    sa = layer.attention.self
    heads = [
        (sa.query.weight, 0),
        (sa.query.bias, 0),
        (sa.key.weight, 0),
        (sa.key.bias, 0),
        (sa.value.weight, 0),
        (sa.value.bias, 0),
        (layer.attention.output.dense.weight, 1),
    ]
    neurons = [(layer.intermediate.dense.weight, 0), (layer.intermediate.dense.bias, 0), (layer.output.dense.weight, 1)]
    return {"heads": heads, "neurons": neurons}


def _reduce(values: list[tuple[Any, int]], groups: int, fn) -> np.ndarray:
    """Sum ``fn(tensor)`` over each of ``groups`` equal slices along each tensor's axis -> float64 [groups]."""
    total = np.zeros(groups)
    for tensor, axis in values:
        t = fn(tensor).detach().float()
        t = (
            t.reshape(groups, -1)
            if axis == 0
            else t.reshape(t.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1)
        )
        total += t.sum(dim=1).double().cpu().numpy()
    return total


def magnitude_scores(wrapper: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One-shot magnitude importance: per layer, the L2 norm of each head's and each neuron's weights.
    Returns ``(head scores [L][H], neuron scores [L][I])`` (float64)."""
    heads, neurons = structure_counts(wrapper)
    hs, ns = [], []
    for layer, h, n in zip(encoder_layers(wrapper), heads, neurons, strict=False):
        p = structure_params(layer)
        hs.append(np.sqrt(_reduce(p["heads"], h, lambda t: t * t)))
        ns.append(np.sqrt(_reduce(p["neurons"], n, lambda t: t * t)))
    return hs, ns


class PlatonScorer:
    """PLATON importance (see module docstring): call :meth:`update` after each ``loss.backward()``.

    Args:
        wrapper: the model being fine-tuned (its structure parameters must have gradients).
        beta1: EMA factor of the sensitivity (paper: 0.85).
        beta2: EMA factor of the uncertainty (paper: 0.95).
    """

    def __init__(self, wrapper: Any, beta1: float = 0.85, beta2: float = 0.95):
        self.wrapper, self.beta1, self.beta2 = wrapper, beta1, beta2
        self._ema: dict[int, Any] = {}
        self._unc: dict[int, Any] = {}
        self.steps = 0

    def update(self) -> None:
        """Fold this step's sensitivity |θ·∇θ| into the moving averages (no-op for params without grad)."""
        import torch

        with torch.no_grad():
            for layer in encoder_layers(self.wrapper):
                for group in structure_params(layer).values():
                    for p, _ in group:
                        if p.grad is None:
                            continue
                        sens = (p * p.grad).abs()
                        key = id(p)
                        if key not in self._ema:
                            self._ema[key] = sens.clone()
                            self._unc[key] = torch.zeros_like(sens)
                        else:
                            self._ema[key].mul_(self.beta1).add_(sens, alpha=1 - self.beta1)
                            self._unc[key].mul_(self.beta2).add_((sens - self._ema[key]).abs(), alpha=1 - self.beta2)
        self.steps += 1

    def scores(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per layer ``Ī·Û`` summed over each head's and each neuron's weights -> ``([L][H], [L][I])``.
        Before any update, falls back to :func:`magnitude_scores`."""
        if not self._ema:
            return magnitude_scores(self.wrapper)
        heads, neurons = structure_counts(self.wrapper)
        hs, ns = [], []

        def score(t):
            return self._ema[id(t)] * self._unc[id(t)] if id(t) in self._ema else t * 0

        for layer, h, n in zip(encoder_layers(self.wrapper), heads, neurons, strict=False):
            p = structure_params(layer)
            hs.append(_reduce(p["heads"], h, score))
            ns.append(_reduce(p["neurons"], n, score))
        return hs, ns


def cubic_sparsity(
    step: int, total_steps: int, final: float, warmup_frac: float = 0.1, final_frac: float = 0.2
) -> float:
    """The cubic schedule of PLATON (after Zhu & Gupta 2017): 0 for the first ``warmup_frac`` of steps,
    then ``final · (1 - (1 - progress)^3)`` rising to ``final`` and held for the last ``final_frac``.
    Returns the target sparsity in [0, final]."""
    start = int(total_steps * warmup_frac)
    end = max(start + 1, int(total_steps * (1 - final_frac)))
    if step < start:
        return 0.0
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return float(final * (1 - (1 - progress) ** 3))


@dataclass
class Masks:
    """Kept structures: ``heads[l]`` bool [H_l], ``neurons[l]`` bool [I_l] (True = kept)."""

    heads: list[np.ndarray]
    neurons: list[np.ndarray]

    @classmethod
    def full(cls, wrapper: Any) -> Masks:
        h, n = structure_counts(wrapper)
        return cls([np.ones(x, bool) for x in h], [np.ones(x, bool) for x in n])

    def sparsity(self) -> tuple[float, float]:
        """Share of heads and of neurons pruned, in [0, 1]."""
        h = np.concatenate(self.heads)
        n = np.concatenate(self.neurons)
        return float(1 - h.mean()), float(1 - n.mean())


#: Kept widths are rounded to a multiple of this many elements (FFN neurons; heads × head size), so that
#: int4 group-wise quantization (groups of 32 along the input axis) and SIMD kernels fit the pruned layers.
ALIGN = 32


def _align(masks: list[np.ndarray], scores: list[np.ndarray], unit: int, align: int) -> None:
    """Round each layer's kept count to the nearest multiple of ``align / gcd(align, unit)`` structures (at
    least one such step, at most the layer's size), in place: adding back the best-scored pruned structures
    or dropping the worst-scored kept ones."""
    step = align // int(np.gcd(align, unit))
    for mask, sc in zip(masks, scores, strict=False):
        if mask.size <= step:
            continue
        kept = int(mask.sum())
        want = min(mask.size, max(step, round(kept / step) * step))
        order = np.argsort(-sc, kind="stable")
        for j in order if want > kept else order[::-1]:
            if kept == want:
                break
            if want > kept and not mask[j]:
                mask[j], kept = True, kept + 1
            elif want < kept and mask[j]:
                mask[j], kept = False, kept - 1


def select(
    head_scores: list[np.ndarray],
    neuron_scores: list[np.ndarray],
    sparsity: float,
    head_sparsity: float | None = None,
    head_size: int = 1,
    align: int = ALIGN,
) -> Masks:
    """Keep the highest-scoring structures: ``round(sparsity · total)`` neurons and
    ``round(head_sparsity · total)`` heads (default: ``sparsity``) are pruned, ranked globally across layers;
    every layer keeps at least one head and one neuron, and each layer's kept width is rounded to the nearest
    multiple of ``align`` elements (``head_size`` elements per head), so the sparsity reached can differ from
    the one asked by less than one ``align`` step per layer. Raises ValueError outside [0, 1)."""
    head_sparsity = sparsity if head_sparsity is None else head_sparsity
    for v in (sparsity, head_sparsity):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity {v} is out of range: use 0 <= sparsity < 1")

    def keep(scores: list[np.ndarray], ratio: float) -> list[np.ndarray]:
        flat = np.concatenate(scores)
        n_prune = round(ratio * flat.size)
        masks = [np.ones(s.size, bool) for s in scores]
        if n_prune == 0:
            return masks
        order = [(s, li, j) for li, sc in enumerate(scores) for j, s in enumerate(sc)]
        order.sort(key=lambda x: (x[0], x[1], x[2]))
        pruned = 0
        for _, li, j in order:
            if pruned >= n_prune:
                break
            if masks[li].sum() > 1:
                masks[li][j] = False
                pruned += 1
        return masks

    heads, neurons = keep(head_scores, head_sparsity), keep(neuron_scores, sparsity)
    if align:
        _align(heads, head_scores, head_size, align)
        _align(neurons, neuron_scores, 1, align)
    return Masks(heads, neurons)


def apply_masks(wrapper: Any, masks: Masks) -> None:
    """Zero the weights (and biases) of every pruned structure in place (see module docstring)."""
    import torch

    with torch.no_grad():
        for layer, hm, nm in zip(encoder_layers(wrapper), masks.heads, masks.neurons, strict=False):
            p = structure_params(layer)
            for group, mask in ((p["heads"], hm), (p["neurons"], nm)):
                if mask.all():
                    continue
                for t, axis in group:
                    keep = torch.from_numpy(np.repeat(mask, t.shape[axis] // mask.size)).to(t.dtype)
                    t.mul_(keep if axis == 0 and t.ndim == 1 else keep[:, None] if axis == 0 else keep[None, :])


def remove_structures(wrapper: Any, masks: Masks) -> dict:
    """Slice the pruned heads and neurons out of the Linear layers, in place. Returns the
    ``edgelm_pruning`` record (kept head indices and FFN sizes per layer) that is also written into the
    Hugging Face config of ``wrapper`` (``wrapper.model.config`` or ``wrapper.base.config``).

    Outputs are unchanged for a wrapper whose pruned structures were already zeroed by
    :func:`apply_masks`; otherwise this is one-shot pruning."""
    record = slice_structures(wrapper, masks.heads, masks.neurons)
    config = getattr(getattr(wrapper, "model", None), "config", None) or wrapper.base.config
    previous = getattr(config, CONFIG_KEY, None)
    if previous:  # pruning a pruned model: head indices refer to the original layout
        record["heads"] = [
            [prev[h] for h in kept] for prev, kept in zip(previous["heads"], record["heads"], strict=False)
        ]
        record["original_heads"] = previous["original_heads"]
        record["original_intermediate_size"] = previous["original_intermediate_size"]
    setattr(config, CONFIG_KEY, record)
    return record


def prune_one_shot(wrapper: Any, sparsity: float, head_sparsity: float | None = None) -> dict:
    """One-shot magnitude pruning (the baseline): score, select, remove. Returns the pruning record."""
    masks = select(*magnitude_scores(wrapper), sparsity, head_sparsity, head_size=head_size(wrapper))
    return remove_structures(wrapper, masks)


def head_size(wrapper: Any) -> int:
    """Elements per attention head (``attention_head_size`` of the first layer)."""
    return int(encoder_layers(wrapper)[0].attention.self.attention_head_size)


def encoder_parameter_count(wrapper: Any) -> int:
    """Parameters in the encoder layers (embeddings and head excluded)."""
    return sum(p.numel() for layer in encoder_layers(wrapper) for p in layer.parameters())
