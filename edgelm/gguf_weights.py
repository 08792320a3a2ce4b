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


@dataclass
class BlockWeights:
    """One weight matrix [out, in] as symmetric groups of :data:`BLOCK` inputs (+ block offsets for Q4_1).

    Attributes:
        kind: the GGUF type (``Q4_0``, ``Q4_1``, ``Q8_0``).
        codes: int8 [out, in]: signed codes, [-8, 7] for 4 bits, [-127, 127] for 8 bits.
        scales: float32 [out, in / 32]: one scale per block (the GGUF's float16 d).
        offsets: float32 [out, in / 32] (``Q4_1``) or None: ``m + 8 d`` per block, see the module docstring.
    """

    kind: str
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None

    @property
    def bits(self) -> int:
        return CARRIED[self.kind]

    def dequantize(self) -> np.ndarray:
        """The float32 weights [out, in] these blocks stand for."""
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


def read_block_weights(path: str | Path, reference: dict[str, Any]) -> dict[str, BlockWeights]:
    """The GGUF file's :data:`CARRIED` weight tensors as :class:`BlockWeights`, keyed by Hugging Face name,
    each checked against ``reference`` (name -> the float32 torch tensor transformers dequantized from the same
    file): the rows are put in the reference's order (llama.cpp stores the q/k projections with their rows
    permuted for its RoPE) and every dequantized value must equal the reference's, or the tensor is left out.

    Returns only tensors that pass; an empty dict for a file with none. Raises ModelError for a file the
    ``gguf`` package cannot read.
    """
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"could not read the GGUF blocks of {path}: {exc}") from None
    out: dict[str, BlockWeights] = {}
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
        order = _row_order(blocks.dequantize(), ref)
        if order is None:
            continue
        blocks.codes, blocks.scales = blocks.codes[order], blocks.scales[order]
        if blocks.offsets is not None:
            blocks.offsets = blocks.offsets[order]
        out[name] = blocks
    return out


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
