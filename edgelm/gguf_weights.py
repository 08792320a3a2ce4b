"""A GGUF model's own 4-bit and 8-bit weights, carried into ExecuTorch and ONNX without quantizing twice.

The reference of a GGUF model is its dequantized weights (:mod:`edgelm.causal_lm`). Quantizing those again to
the symmetric int4 grid that XNNPACK (``qb4w``) and ONNX Runtime (``MatMulNBits``) run rounds every weight a
second time: on SmolLM2-135M (Q4_1) that alone raised perplexity 1.3-1.5x. This module reads the GGUF blocks
and rewrites them exactly in the runtimes' formats instead.

GGUF block formats (llama.cpp ``ggml-common.h``; blocks of 32 consecutive inputs of one output row):

- ``Q4_0``: ``w = d * (q - 8)``, q in [0, 15], d float16. That is a symmetric int4 group of 32 with scale d:
  exact as it is.
- ``Q4_1``: ``w = d * q + m``, q in [0, 15], d and m float16. Written as ``d * (q - 8) + (m + 8 d)``: a
  symmetric int4 group (scale d) plus one **block offset** ``o = m + 8 d`` per block, so that
  ``y = W x = W4 x + O s(x)``, where ``s(x)`` [..., in / 32] sums x over each block and O [out, in / 32] holds
  the offsets (float32, 1/32 of the weights' count). Both terms are exact.
- ``Q8_0``: ``w = d * q``, q int8 in [-127, 127]: exact as an 8-bit group of 32.

Other GGUF types (K-quants, float) are not carried: their tensors are quantized from the dequantized weights
as for any float checkpoint.

A checkpoint made from the GGUF whose weight differs from the blocks by an update of rank at most
:data:`MAX_UPDATE_RANK` (a merged LoRA, Hu et al. 2022: ``W = W0 + B A``) keeps the blocks and carries the
update as a float low-rank pair beside them (:attr:`BlockWeights.lowrank`, from the SVD of ``W - W0``), the way
llama.cpp applies a LoRA (``--lora``) over a quantized base: quantizing ``W`` to 4 bits again instead rounds
the update away (SmolLM2's merged LoRA moved its weights by a median 0.017 of a Q4_1 step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ModelError
from edgelm.models import name_map

#: Elements per GGUF block of the types carried here.
BLOCK = 32
#: GGUF tensor names (llama.cpp) -> Hugging Face Llama-family parameter names (``{}``: the layer index).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
_hf_name = name_map(GGUF_TO_HF)
#: GGUF types carried exactly -> weight bits.
CARRIED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
#: The highest rank of a weight update carried beside the blocks (see the module docstring).
MAX_UPDATE_RANK = 64


@dataclass
class BlockWeights:
    """One weight matrix [out, in] as symmetric groups of :data:`BLOCK` inputs (+ block offsets for Q4_1).

    Attributes:
        kind: the GGUF type (``Q4_0``, ``Q4_1``, ``Q8_0``).
        codes: int8 [out, in]: signed codes, [-8, 7] for 4 bits, [-127, 127] for 8 bits.
        scales: float32 [out, in / 32]: one scale per block (the GGUF's float16 d).
        offsets: float32 [out, in / 32] (``Q4_1``) or None: ``m + 8 d`` per block, see the module docstring.
        lowrank: None, or (up float32 [out, r], down float32 [r, in]): a float update the weight carries beside
            the blocks, ``W = dequantize() + up @ down`` (a merged LoRA; see the module docstring).
    """

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    lowrank: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def bits(self) -> int:
        return CARRIED[self.kind]

    def dequantize(self) -> np.ndarray:
        """The float32 weights [out, in] the blocks stand for (without :attr:`lowrank`)."""
        out, n = self.codes.shape
        w = self.codes.reshape(out, n // BLOCK, BLOCK).astype(np.float32) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(out, n)


def _decode(kind: str, raw: np.ndarray, rows: int, cols: int) -> BlockWeights:
    """Decode ``raw`` (uint8 [rows, bytes per row], GGUF block layout) into :class:`BlockWeights`."""
    nb = cols // BLOCK
    if kind == "Q8_0":  # d f16, qs int8[32]
        blocks = raw.reshape(rows, nb, 34)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return BlockWeights(kind, codes, d, None)
    size = 18 if kind == "Q4_0" else 20  # Q4_0: d f16, qs[16]; Q4_1: d f16, m f16, qs[16]
    blocks = raw.reshape(rows, nb, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., size - 16 :]
    # element j is the low nibble of qs[j], element j + 16 the high nibble
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8)
    codes = (q - 8).reshape(rows, cols)
    offsets = None
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offsets = (m + 8 * d).astype(np.float32)
    return BlockWeights(kind, codes, d, offsets)


def read_block_weights(
    path: str | Path, reference: dict[str, Any], max_rank: int = MAX_UPDATE_RANK
) -> dict[str, BlockWeights]:
    """The GGUF file's :data:`CARRIED` weight tensors as :class:`BlockWeights`, keyed by Hugging Face name,
    each checked against ``reference`` (name -> the float32 torch tensor transformers dequantized from the same
    file): the rows are put in the reference's order (llama.cpp stores the q/k projections with their rows
    permuted for its RoPE) and every dequantized value must equal the reference's, or differ from it by an
    update of rank <= ``max_rank`` (then carried as :attr:`BlockWeights.lowrank`), or the tensor is left out.

    Returns only tensors that pass; an empty dict for a file with none. Raises ModelError for a file the
    ``gguf`` package cannot read.
    """
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"could not read the GGUF blocks of {path}: {exc}") from None
    out: dict[str, BlockWeights] = {}
    heads = _head_counts(reader)
    for t in reader.tensors:
        kind = t.tensor_type.name
        name = _hf_name(t.name)
        if kind not in CARRIED or name is None or name not in reference:
            continue
        ref = reference[name].detach().float().numpy()
        cols, rows = (int(x) for x in t.shape[:2])  # GGUF shapes are innermost first
        if ref.shape != (rows, cols) or cols % BLOCK:
            continue
        blocks = _decode(kind, np.asarray(t.data).reshape(rows, -1), rows, cols)
        dequantized = blocks.dequantize()
        order = _row_order(dequantized, ref)
        update = None
        if order is None and max_rank > 0:  # the same blocks plus a low-rank update, in either row order
            proj = name.split(".")[-2]
            for candidate in (np.arange(rows), _rope_order(rows, heads.get(proj, 0))):
                if candidate is None:
                    continue
                update = _low_rank_update(ref - dequantized[candidate], max_rank, _tolerance(ref))
                if update is not None:
                    order = candidate
                    break
        if order is None:
            continue
        blocks.codes, blocks.scales = blocks.codes[order], blocks.scales[order]
        if blocks.offsets is not None:
            blocks.offsets = blocks.offsets[order]
        blocks.lowrank = update
        out[name] = blocks
    return out


def _rope_order(rows: int, heads: int) -> np.ndarray | None:
    """Indices that put a q/k projection's rows from llama.cpp's order (``convert_hf_to_gguf.py``
    ``LlamaModel.permute``: each head's rotary halves interleaved) back into Hugging Face's; None when
    ``rows`` does not split into ``heads`` heads of even size."""
    if heads < 1 or rows % (2 * heads):
        return None
    permuted = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(permuted)


def _head_counts(reader: Any) -> dict[str, int]:
    """``{"q_proj": heads, "k_proj": kv heads}`` from the GGUF's ``<arch>.attention.head_count[_kv]``."""
    out: dict[str, int] = {}
    for key, field in reader.fields.items():
        for suffix, proj in ((".attention.head_count", "q_proj"), (".attention.head_count_kv", "k_proj")):
            if key.endswith(suffix):
                try:
                    out[proj] = int(field.contents())
                except (TypeError, ValueError):
                    pass
    return out


def _low_rank_update(delta: np.ndarray, max_rank: int, atol: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(up [out, r], down [r, in]) float32 with ``up @ down`` equal to ``delta`` [out, in] within ``atol`` (the
    float32 rounding of ``W0 + B A``) at the smallest rank r <= ``max_rank`` tried (truncated SVD in float64,
    r where the singular values fall below 1e-3 ... 1e-8 of the largest); None when there is none."""
    if not np.abs(delta).max() > 0:
        return None
    max_rank = min(max_rank, min(delta.shape) // 4)  # low rank: at most a quarter of the smaller side
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    for r in sorted({int((s > s[0] * 10.0**-k).sum()) for k in range(3, 9)}):
        if r > max_rank:
            return None
        up, down = u[:, :r] * s[:r], vt[:r]
        if np.abs(up @ down - delta).max() <= atol:
            return up.astype(np.float32), down.astype(np.float32)
    return None


def _row_order(dequantized: np.ndarray, reference: np.ndarray) -> np.ndarray | None:
    """Indices ``order`` with ``dequantized[order] == reference`` (within float32 rounding of ``m + 8 d``), or
    None when some reference row has no match."""
    if np.allclose(dequantized, reference, rtol=0, atol=_tolerance(reference)):
        return np.arange(len(reference))
    index: dict[bytes, int] = {}
    for i, row in enumerate(dequantized):
        index.setdefault(_row_key(row), i)
    order = [index.get(_row_key(row)) for row in reference]
    if any(i is None for i in order):
        return None
    order = np.asarray(order)
    return order if np.allclose(dequantized[order], reference, rtol=0, atol=_tolerance(reference)) else None


def _tolerance(reference: np.ndarray) -> float:
    return float(np.abs(reference).max()) * 1e-6 + 1e-12


def _row_key(row: np.ndarray) -> bytes:
    # rounded so that ``d*q + m`` and ``d*(q-8) + (m + 8d)`` (float32) hash alike
    scale = float(np.abs(row).max()) or 1.0
    return np.round(row / scale * 1e5).astype(np.int64).tobytes()
