"""SmoothQuant's equivalent rescaling for Llama-family decoders (Xiao et al. 2023, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models", arXiv:2211.10438).

Runtimes that quantize activations to int8 on the fly (LiteRT's dynamic-range ops, XNNPACK's ``qd8`` kernels)
lose most where a few input channels of a linear layer carry values far larger than the rest: one scale per
row then leaves the other channels a handful of int8 steps. SmoothQuant divides each input channel j by
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) and multiplies the weight's column j by s_j, so the product is
unchanged in float and part of the activations' range moves into the weights (which are quantized per output
channel and take it more easily). The division is folded into the layer that produces x:

- q/k/v projections: the input RMSNorm's gain;
- gate/up projections: the post-attention RMSNorm's gain;
- down projection: the up projection's output rows (silu(gate) * up is linear in up);
- output projection: the value projection's output rows (attention weights mix positions, not channels),
  one scale per KV channel, the largest over the query heads that share it (grouped-query attention).

The float model computes the same logits to rounding; only its quantized form changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The migration strength the paper uses for most models (the profiles' ``[llm] smoothquant_alpha`` default).
DEFAULT_ALPHA = 0.5
#: Calibration rows are this many tokens long.
CALIBRATION_ROW_TOKENS = 512


def calibration_rows(ids: list[int] | np.ndarray, max_tokens: int = 2048) -> np.ndarray:
    """``ids`` (at most ``max_tokens`` of them) as int64 [rows, T] rows of :data:`CALIBRATION_ROW_TOKENS`
    tokens (one shorter row when there are fewer). Raises ValueError when ``ids`` has fewer than 2 tokens."""
    ids = np.asarray(ids, dtype=np.int64)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("SmoothQuant needs at least 2 calibration tokens")
    if len(ids) < CALIBRATION_ROW_TOKENS:
        return ids[None]
    n = len(ids) // CALIBRATION_ROW_TOKENS * CALIBRATION_ROW_TOKENS
    return ids[:n].reshape(-1, CALIBRATION_ROW_TOKENS)


def input_maxima(model: Any, calibration: np.ndarray) -> dict[tuple[int, str], Any]:
    """max |x| per input channel (float32 [in]) of each layer's q (= k, v), o, gate (= up) and down projections
    over the ``calibration`` rows (int64 [rows, T]), keyed by (layer index, "qkv" / "o" / "gu" / "down")."""
    import torch

    stats: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for key, mod in (("qkv", a.q_proj), ("o", a.o_proj), ("gu", m.gate_proj), ("down", m.down_proj)):

            def record(mod, args, k=(i, key)):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[k] = torch.maximum(stats[k], x) if k in stats else x

            hooks.append(mod.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for row in calibration:
                model(torch.as_tensor(np.asarray(row, dtype=np.int64))[None])
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth(model: Any, calibration: np.ndarray, alpha: float = DEFAULT_ALPHA) -> int:
    """Apply SmoothQuant's rescaling to the Hugging Face Llama-family causal LM ``model`` (LlamaForCausalLM,
    MistralForCausalLM, Qwen2/Qwen3ForCausalLM; float32), in place, calibrated on ``calibration`` (int64
    [rows, T] token ids; see :func:`calibration_rows`) with migration strength ``alpha`` (0 < alpha <= 1).
    Biases of the producing layers (Qwen2's value projection) are divided with their rows.

    Returns the number of linear layers whose input was rescaled (4 per block: q/k/v, gate/up, down, o).
    Raises ValueError: ``alpha`` outside (0, 1], or a model whose blocks are not Llama-shaped."""
    import torch

    if not 0 < alpha <= 1:
        raise ValueError(f"SmoothQuant's alpha is in (0, 1], not {alpha}")
    cfg = model.config
    heads, kv_heads = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or 0)
    kv_heads = kv_heads or heads
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(lay, "self_attn") and hasattr(lay, "mlp") for lay in layers):
        raise ValueError(f"SmoothQuant here rescales Llama-family decoders, not {type(model).__name__}")
    stats = input_maxima(model, calibration)

    def scales(xmax, weights):
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        return (xmax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)

    def divide_rows(linear, s):
        linear.weight.div_(s[:, None])
        if linear.bias is not None:
            linear.bias.div_(s)

    with torch.no_grad():
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            s = scales(stats[(i, "qkv")], [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            layer.input_layernorm.weight.div_(s)
            for proj in (a.q_proj, a.k_proj, a.v_proj):
                proj.weight.mul_(s)
            s = scales(stats[(i, "gu")], [m.gate_proj.weight, m.up_proj.weight])
            layer.post_attention_layernorm.weight.div_(s)
            for proj in (m.gate_proj, m.up_proj):
                proj.weight.mul_(s)
            s = scales(stats[(i, "down")], [m.down_proj.weight])
            divide_rows(m.up_proj, s)
            m.down_proj.weight.mul_(s)
            group = heads // kv_heads
            per_kv = scales(stats[(i, "o")], [a.o_proj.weight]).view(kv_heads, group, -1).amax(1)
            divide_rows(a.v_proj, per_kv.reshape(-1))
            a.o_proj.weight.mul_(per_kv.repeat_interleave(group, 0).reshape(-1))
    return 4 * len(layers)
