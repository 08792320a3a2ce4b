"""Generative decoders (causal LMs with a KV cache): export to ExecuTorch and ONNX with the runtimes' own LLM
tooling, and run them one step at a time.

Export (torch side; never imports edgelm):

- :func:`export_executorch`: ExecuTorch's own LLM export (``executorch.examples.models.llama.export_llama``
  with an ``LlmConfig``): ExecuTorch's Llama-family transformer, a static KV cache of ``max_context_len``
  positions held in the program (``llama::update_cache``), ExecuTorch's custom SDPA
  (``llama::custom_sdpa``), torchao quantization (``8da4w``: int8 dynamic activations, int4 weights per
  group of ``group_size`` on every linear including the output head; 8-bit per-row embeddings; with a GGUF's
  ``blocks``, its own int4 codes and scales plus block offsets, and an 8-bit head), lowered to XNNPACK. One
  method ``forward(tokens int64 [1, n], input_pos int64 [1]) -> logits float32 [1, vocab]`` (the last position's) runs a prefill of ``n`` tokens or a decode step, and the constant methods that
  ExecuTorch's LLM runner and the Android ``LlmModule`` read (``get_max_context_len``, ``get_max_seq_len``,
  ``get_bos_id``, ``get_eos_ids``, ``get_vocab_size``, ``use_kv_cache``, ``get_n_layers`` ...).
- :func:`export_onnx`: ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``): a decoder
  with the KV cache as inputs/outputs (``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``), int4
  block-wise weights (``MatMulNBits``, block ``group_size``, ``accuracy_level=4``: activations int8 per
  block, i.e. 8da4w), a tied embedding shared with the int4 head (``GatherBlockQuantized``), and
  ``genai_config.json`` so that ``onnxruntime_genai.Model(folder)`` runs it as it is. With a GGUF's
  ``blocks``, :func:`carry_block_weights_onnx` writes its own weights over the builder's.

Run (runtime side: numpy + the runtime): :func:`load_decoder` -> a :class:`DecoderSession` whose
``forward(tokens, pos)`` feeds ``tokens`` int64 [n] at positions ``pos .. pos+n-1`` and returns float32
logits [n, vocab] (ONNX, LiteRT: every position) or [1, vocab] (ExecuTorch: the last position).

LiteRT (``.tflite``, litert-torch's generative API: ``prefill_<N>`` and ``decode`` signatures) lives in
:mod:`exporters.decoder_tflite`; :func:`load_decoder` opens it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exporters.base import (
    ArtifactLoadError,
    ExportFailedError,
    QuantSpec,
    UnsupportedQuantError,
    check_artifact_file,
    package_versions,
    require,
    require_installed,
)

#: Schemes a decoder export can produce: ``8da4w`` (the default) and ``fp32`` (the exact reference).
DECODER_SCHEMES = ("8da4w", "fp32")
#: ONNX Runtime GenAI's configuration file; it names the ONNX file and is read by ``onnxruntime_genai.Model``.
GENAI_CONFIG = "genai_config.json"


def _check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in DECODER_SCHEMES:
        raise UnsupportedQuantError(
            f"generative models export as {' or '.join(DECODER_SCHEMES)}, not {scheme!r} "
            "(8da4w: int8 dynamic activations, int4 group-wise weights, 8-bit embeddings)"
        )
    QuantSpec(scheme=scheme, group_size=group_size)  # the exporter layer's group-size check


def export_executorch(
    checkpoint: Path,
    params: Path,
    path: Path,
    *,
    scheme: str = "8da4w",
    group_size: int = 32,
    max_context_len: int = 512,
    bos_id: int | None = None,
    eos_ids: list[int] | None = None,
    vocab_size: int | None = None,
    blocks: dict[str, Any] | None = None,
    recurrent: dict[int, dict[str, Any]] | None = None,
    max_seq_len: int | None = None,
    prefix: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Export a Llama-family checkpoint in ExecuTorch's layout (``checkpoint``: a ``.pth`` state dict,
    ``params``: its ``params.json``; see :func:`edgelm.causal_lm.executorch_checkpoint`) to the ``.pte`` at
    ``path`` with ExecuTorch's LLM export. ``max_context_len``: KV-cache positions (tokens). Returns the export facts (scheme, group size, context length, seconds, methods).

    ``blocks`` (``8da4w`` only): a GGUF file's own weights by ExecuTorch name (``layers.0.attention.wq.weight``
    -> an object with ``bits``, ``codes`` int8 [out, in], ``scales`` float32 [out, in / 32], ``offsets`` float32
    [out, in / 32] or None; see :mod:`edgelm.gguf_weights`). Those linears keep the GGUF's int4 codes and
    scales exactly (torchao ``IntxUnpackedToInt8Tensor`` with the given scales) plus the block-offset term; the
    others are quantized 8da4w as usual, and the output head 8da8w per channel (int8 weights: the GGUF's head is
    8-bit, and an int4 head costs most of the accuracy).

    ``recurrent``: a hybrid RNN-Transformer's QRNN blocks by layer (0-based) -> ``{"window": w,
    "gates.weight": float32 [3 D, w H], "gates.bias": [3 D], "o_proj.weight": [H, D]}``; those layers'
    attention (and its KV cache) is replaced by :func:`qrnn_attention_class` with its state as mutable
    buffers, quantized like every other linear. ``max_seq_len``: one more than the longest call (ExecuTorch
    bounds a call at ``max_seq_len - 1`` tokens and the program's ``get_max_seq_len`` says that bound; the LLM
    runner splits longer prompts by it; default ``max_context_len``, 65 with ``recurrent``).

    ``prefix``: a soft prompt built into the program (prompt tuning) as its keys and values per layer,
    ``{"keys": [float32 [kv_heads, P, head_dim]] * layers, "values": [...]}`` (after RoPE at positions
    0..P-1, as transformers' cache holds them): every call writes them at cache positions 0..P-1 and runs the
    user's tokens at ``input_pos + P``, so the runtime passes only the user's tokens and positions from 0.
    The cache has ``max_context_len + P`` positions; ``get_max_context_len`` says ``max_context_len``.

    Raises:
        UnsupportedQuantError: a scheme other than :data:`DECODER_SCHEMES`.
        RuntimeNotInstalledError: executorch (or torchao) is not installed.
        ExportFailedError: ExecuTorch's export failed (the message has its last line).
    """
    _check_scheme(scheme, group_size)
    require_installed(("executorch", "executorch"), ("torchao", "torchao"), purpose="to export .pte decoders")
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType

    if recurrent and not max_seq_len:
        max_seq_len = 65  # the closed-form scan holds [T, T, D] floats per call: prompts go in chunks of 64
    # ExecuTorch's export bounds the token dimension at max_seq_len - 1, and its LLM runner splits prompts by
    # get_max_seq_len: say the bound
    metadata: dict[str, Any] = {"get_max_seq_len": int(max_seq_len or max_context_len) - 1}
    n_prefix = int(prefix["keys"][0].shape[1]) if prefix else 0
    if n_prefix:
        metadata["get_max_context_len"] = int(max_context_len)  # what the user's tokens may fill
    if bos_id is not None:
        metadata["get_bos_id"] = int(bos_id)
    if eos_ids:
        metadata["get_eos_ids"] = [int(x) for x in eos_ids]
    if vocab_size:
        metadata["get_vocab_size"] = int(vocab_size)
    cfg = LlmConfig()
    cfg.base.model_class = ModelType.llama3
    cfg.base.params, cfg.base.checkpoint = str(params), str(checkpoint)
    cfg.base.metadata = json.dumps(metadata)
    cfg.model.use_kv_cache = True
    cfg.model.use_sdpa_with_kv_cache = True
    cfg.model.enable_dynamic_shape = True
    cfg.export.max_seq_length = int(max_seq_len or max_context_len)
    cfg.export.max_context_length = int(max_context_len) + n_prefix
    if scheme == "8da4w":
        cfg.quantization.qmode = None if blocks else "8da4w"  # with blocks: _carry_blocks quantizes the linears
        cfg.quantization.group_size = int(group_size)
        cfg.quantization.embedding_quantize = "8,0"  # 8 bits, one scale per row
    cfg.backend.xnnpack.enabled = True
    cfg.backend.xnnpack.extended_ops = True
    path = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgelm-et-llm-") as tmp:
        cfg.export.output_dir = tmp
        cfg.export.output_name = str(Path(tmp) / "model.pte")
        carried: dict[str, int] = {}
        try:
            with (
                _metadata_after_init({"get_max_seq_len": metadata["get_max_seq_len"]}),
                _extra_source_transform(_replace_with_qrnn(recurrent) if recurrent else None, first=True),
                _extra_source_transform(
                    _carry_blocks(blocks, group_size, carried) if blocks and scheme == "8da4w" else None
                ),
                _extra_source_transform(_with_prefix(prefix) if n_prefix else None),
            ):
                export_llama(cfg)
        except Exception as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ExportFailedError(f"ExecuTorch's LLM export failed: {first}") from exc
        shutil.move(str(Path(tmp) / "model.pte"), path)
    return {
        "exporter": "executorch.examples.models.llama.export_llama (XNNPACK, custom SDPA, static KV cache)",
        "scheme": scheme,
        "group_size": group_size if scheme == "8da4w" else None,
        "embedding_bits": 8 if scheme == "8da4w" else None,
        "head_bits": (8 if blocks else 4) if scheme == "8da4w" else None,
        "gguf_blocks": carried,
        "max_context_len": int(max_context_len),
        "max_seq_len": int(max_seq_len or max_context_len),
        "recurrent_layers": sorted(int(i) for i in recurrent) if recurrent else [],
        "soft_prompt_tokens": n_prefix,
        "seconds": round(time.perf_counter() - t0, 1),
    }


@contextlib.contextmanager
def _metadata_after_init(values: dict[str, Any]) -> Iterator[None]:
    """Set ``values`` in the constant methods of ExecuTorch's LLM export after its ``LLMEdgeManager`` sets its
    own (it writes ``get_max_seq_len`` itself, after the ``--metadata`` values; executorch 1.5), while
    inside."""
    from executorch.extension.llm.export.builder import LLMEdgeManager

    original = LLMEdgeManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.metadata.update(values)

    LLMEdgeManager.__init__ = init
    try:
        yield
    finally:
        LLMEdgeManager.__init__ = original


@contextlib.contextmanager
def _extra_source_transform(transform, first: bool = False) -> Iterator[None]:
    """Append ``transform`` (nn.Module -> nn.Module) to the source transforms ExecuTorch's LLM export applies
    after loading its checkpoint (``export_llama_lib._get_source_transforms``; executorch 1.5), or put it before
    them (``first``: before its quantization), while inside. ``export_llama`` takes no custom transform
    otherwise."""
    if transform is None:
        yield
        return
    from executorch.examples.models.llama import export_llama_lib

    original = export_llama_lib._get_source_transforms
    export_llama_lib._get_source_transforms = lambda *a, **k: (
        [transform, *original(*a, **k)] if first else [*original(*a, **k), transform]
    )
    try:
        yield
    finally:
        export_llama_lib._get_source_transforms = original


def _with_prefix(prefix: dict[str, list[np.ndarray]]):
    """The source transform for :func:`export_executorch`'s ``prefix`` (applied last, after ExecuTorch's own
    KV-cache transforms): each attention's cache writes the prefix at positions 0..P-1 before every update,
    and the model runs the user's tokens at ``input_pos + P``."""
    import torch

    keys, values = prefix["keys"], prefix["values"]
    n = int(keys[0].shape[1])

    class PrefixKVCache(torch.nn.Module):
        def __init__(self, inner, k, v):
            super().__init__()
            self.inner = inner
            self.register_buffer("k_prefix", torch.as_tensor(np.asarray(k, dtype=np.float32))[None], persistent=False)
            self.register_buffer("v_prefix", torch.as_tensor(np.asarray(v, dtype=np.float32))[None], persistent=False)

        def update(self, input_pos, k_val, v_val, *args, **kwargs):
            # position 0 computed from the input: a constant one would be folded away with the write
            self.inner.update(input_pos[:1] * 0, self.k_prefix, self.v_prefix)
            return self.inner.update(input_pos, k_val, v_val, *args, **kwargs)

        def __getattr__(self, name):  # is_ring_buffer and the like: the inner cache's
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

    def transform(model):
        layers = list(model.layers)
        if len(layers) != len(keys):
            raise ExportFailedError(f"the soft prompt has keys for {len(keys)} layers, the model {len(layers)}")
        for layer, k, v in zip(layers, keys, values, strict=True):
            if getattr(layer.attention, "kv_cache", None) is None:
                raise ExportFailedError("a soft prompt needs every layer's KV cache (a hybrid QRNN has none)")
            layer.attention.kv_cache = PrefixKVCache(layer.attention.kv_cache, k, v)
        base = type(model)

        class WithSoftPrompt(base):
            def forward(self, tokens=None, attn_options=None, h=None):
                options = dict(attn_options or {})
                options["input_pos"] = options["input_pos"] + n
                return base.forward(self, tokens, options, h)

        model.__class__ = WithSoftPrompt
        return model

    return transform


def _replace_with_qrnn(recurrent: dict[int, dict[str, Any]]):
    """The source transform for :func:`export_executorch`'s ``recurrent``: ``layers[i].attention`` of
    ExecuTorch's Llama transformer becomes a :func:`qrnn_attention_class` with the given weights."""

    def transform(model):
        cls = qrnn_attention_class()
        for i, w in recurrent.items():
            model.layers[int(i)].attention = cls.from_weights(w)
        return model

    return transform


def qrnn_attention_class():
    """The QRNN block of a hybrid RNN-Transformer in ExecuTorch's Llama transformer (the attention call:
    ``(x float32 [1, T, H], freqs_cos, freqs_sin, input_pos=int64 [1]) -> (y [1, T, H], None)``).

    Its state is two mutable buffers held in the program like the KV cache: ``c`` float32 [1, D] (the
    fo-pooling state) and ``past`` [1, w - 1, H] (the inputs the causal convolution still needs); both are
    reset when ``input_pos`` is 0. The gates are a linear map of each position's window of inputs, then
    fo-pooling over the T positions of the call in closed form, so one graph serves a prefill and a decode
    step (T = 1): with A_t = sum_{r<=t} log f_r, c_t = exp(A_t) c_0 + sum_{s<=t} exp(A_t - A_s) (1 - f_s) z_s,
    every exponent <= 0 ([1, T, T, D] floats for a call of T positions; the prefill chunk bounds T). Bradbury
    et al. 2017 (arXiv:1611.01576); :mod:`edgelm.compress.hybrid_qrnn` trains it."""
    import torch

    class QRNNAttentionET(torch.nn.Module):
        def __init__(self, hidden: int, inner: int, window: int):
            super().__init__()
            self.hidden, self.inner, self.window = hidden, inner, window
            self.gates = torch.nn.Linear(hidden * window, 3 * inner)
            self.o_proj = torch.nn.Linear(inner, hidden, bias=False)
            self.register_buffer("c", torch.zeros(1, inner))
            self.register_buffer("past", torch.zeros(1, max(window - 1, 1), hidden))

        @classmethod
        def from_weights(cls, w: dict[str, Any]):
            gates = torch.as_tensor(np.asarray(w["gates.weight"], dtype=np.float32))
            out = torch.as_tensor(np.asarray(w["o_proj.weight"], dtype=np.float32))
            block = cls(out.shape[0], out.shape[1], int(w["window"]))
            if tuple(gates.shape) != (3 * block.inner, block.hidden * block.window):
                raise ExportFailedError(
                    f"QRNN gates of shape {tuple(gates.shape)} do not fit hidden {block.hidden}, inner "
                    f"{block.inner}, window {block.window}"
                )
            with torch.no_grad():
                block.gates.weight.copy_(gates)
                block.gates.bias.copy_(torch.as_tensor(np.asarray(w["gates.bias"], dtype=np.float32)))
                block.o_proj.weight.copy_(out)
            return block

        def forward(self, x, freqs_cos, freqs_sin, **kwargs):
            input_pos = kwargs.get("input_pos")
            t = x.shape[1]
            keep = (input_pos[0] != 0).to(x.dtype) if input_pos is not None else x.new_zeros(())
            c0, past = self.c * keep, self.past * keep
            if self.window > 1:
                seq = torch.cat([past, x], dim=1)
                windows = torch.cat([seq[:, k : k + t] for k in range(self.window)], dim=-1)
            else:
                seq, windows = x, x
            z, f, o = self.gates(windows).chunk(3, dim=-1)
            z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
            a = torch.cumsum(torch.log(f.clamp_min(1e-12)), dim=1)  # [1, T, D]
            idx = torch.arange(t)
            causal = (idx[:, None] >= idx[None, :])[None, :, :, None]  # [1, T, T, 1]
            decay = torch.exp(torch.where(causal, a[:, :, None, :] - a[:, None, :, :], float("-inf")))
            c = (decay * ((1 - f) * z)[:, None, :, :]).sum(dim=2) + torch.exp(a) * c0[:, None, :]
            with torch.no_grad():
                self.c.copy_(c[:, -1])
                if self.window > 1:
                    self.past.copy_(seq[:, seq.shape[1] - (self.window - 1) :])
            return self.o_proj(o * c), None

    return QRNNAttentionET


def _carry_blocks(blocks: dict[str, Any], group_size: int, counts: dict[str, int]):
    """The source transform for :func:`export_executorch`'s ``blocks``: every ``nn.Linear`` whose
    ``<name>.weight`` has 4-bit blocks becomes a ``BlockLinear`` (:func:`_block_linear_class`: exact GGUF
    codes and scales, 8da4w, plus a float low-rank branch where the blocks carry one), the ``output`` head
    8da8w per channel, any other linear 8da4w (group ``group_size``, HQQ scales as ExecuTorch's own
    ``8da4w``). ``counts`` receives ``{"int4": n, "int4_offsets": n}`` and ``"lowrank": n`` where some carry
    a low-rank update."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    def transform(model):
        block_linear = _block_linear_class()
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                b = blocks.get(f"{full}.weight")
                if isinstance(child, torch.nn.Linear) and b is not None and b.bits == 4:
                    setattr(module, child_name, block_linear(b, child.bias))
                    counts["int4"] = counts.get("int4", 0) + 1
                    counts["int4_offsets"] = counts.get("int4_offsets", 0) + int(b.offsets is not None)
                    if getattr(b, "lowrank", None) is not None:
                        counts["lowrank"] = counts.get("lowrank", 0) + 1
        with torch.no_grad():
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn == "output",
            )
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(
                    weight_dtype=torch.int4,
                    weight_granularity=PerGroup(group_size),
                    intx_choose_qparams_algorithm="hqq_scale_only",
                ),
                filter_fn=lambda m, fqn: (
                    type(m) is torch.nn.Linear
                    and fqn != "output"
                    and not fqn.endswith((".offsets", ".int4", ".lowrank_down", ".lowrank_up"))
                    and m.weight.shape[1] % group_size == 0
                ),
            )
        return model

    return transform


def _block_linear_class():
    import torch

    class BlockLinear(torch.nn.Module):
        """``y = int4(x) + offsets(block sums of x) + lowrank_up(lowrank_down(x))``: a GGUF Q4_0/Q4_1 linear,
        exact (see :mod:`edgelm.gguf_weights`). ``int4``: 8da4w linear with the GGUF's codes and scales
        (torchao ``IntxUnpackedToInt8Tensor``, int8 dynamic per-token activations); ``offsets``: float32
        linear [in / 32 -> out] on the sums of x over each block of 32 inputs (Q4_1 only); ``lowrank_down``
        [in -> r] and ``lowrank_up`` [r -> out]: float32 linears of a merged LoRA's update (only where the
        blocks carry one)."""

        def __init__(self, b, bias):
            super().__init__()
            from torchao.quantization import IntxUnpackedToInt8Tensor
            from torchao.quantization.quant_primitives import MappingType

            out, n = b.codes.shape
            codes = torch.from_numpy(np.ascontiguousarray(b.codes)).float()
            scales = torch.from_numpy(np.ascontiguousarray(b.scales)).float()
            hp = (codes.view(out, n // 32, 32) * scales[..., None]).view(out, n)
            weight = IntxUnpackedToInt8Tensor.from_hp(
                hp,
                (1, 32),
                torch.int4,
                mapping_type=MappingType.SYMMETRIC,
                activation_quantization="int8_asym_per_token",
                intx_choose_qparams_algorithm=None,
                custom_scale=scales,
                custom_zero_point=torch.zeros_like(scales, dtype=torch.int8),
            )
            self.int4 = torch.nn.Linear(n, out, bias=bias is not None)
            self.int4.weight = torch.nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                self.int4.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False)
            self.offsets = None
            if b.offsets is not None:
                self.offsets = torch.nn.Linear(n // 32, out, bias=False)
                self.offsets.weight = torch.nn.Parameter(
                    torch.from_numpy(np.ascontiguousarray(b.offsets)).float(), requires_grad=False
                )
            self.lowrank_down = self.lowrank_up = None
            if getattr(b, "lowrank", None) is not None:
                up, down = (torch.from_numpy(np.ascontiguousarray(m)).float() for m in b.lowrank)
                self.lowrank_down = torch.nn.Linear(n, down.shape[0], bias=False)
                self.lowrank_down.weight = torch.nn.Parameter(down, requires_grad=False)
                self.lowrank_up = torch.nn.Linear(down.shape[0], out, bias=False)
                self.lowrank_up.weight = torch.nn.Parameter(up, requires_grad=False)

        def forward(self, x):
            y = self.int4(x)
            if self.offsets is not None:
                y = y + self.offsets(x.unflatten(-1, (-1, 32)).sum(-1))
            if self.lowrank_up is not None:
                y = y + self.lowrank_up(self.lowrank_down(x))
            return y

    return BlockLinear


def export_onnx(
    hf_dir: Path,
    path: Path,
    *,
    scheme: str = "8da4w",
    group_size: int = 32,
    max_context_len: int = 512,
    timeout_s: float = 1800.0,
    blocks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export the Hugging Face checkpoint in ``hf_dir`` with ONNX Runtime GenAI's model builder to the ONNX
    file ``path`` (its weights in ``<path>.data``; ``genai_config.json`` and the tokenizer files beside it).
    ``8da4w``: int4 ``MatMulNBits`` weights in blocks of ``group_size``, ``accuracy_level=4`` (int8
    activations); ``fp32``: float weights. ``max_context_len`` is written as the model's context length.
    ``blocks`` (``8da4w`` only; Hugging Face names, see :func:`carry_block_weights_onnx`): a GGUF file's own
    weights, written over the builder's re-quantized ones.

    Raises UnsupportedQuantError, RuntimeNotInstalledError (onnxruntime-genai), ExportFailedError.
    """
    _check_scheme(scheme, group_size)
    require_installed(("onnxruntime_genai", "onnxruntime-genai"), purpose="to export ONNX decoders (its model builder)")
    path = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgelm-genai-") as tmp:
        out, cache = Path(tmp) / "out", Path(tmp) / "cache"
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out),
            "-p",
            "int4" if scheme == "8da4w" else "fp32",
            "-e",
            "cpu",
            "-c",
            str(cache),
            "--extra_options",
            f"filename={path.name}",
            "hf_token=false",
        ]
        if scheme == "8da4w":
            cmd += [f"block_size={group_size}", "accuracy_level=4"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ExportFailedError(f"ONNX Runtime GenAI's model builder took over {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not (out / path.name).is_file():
            lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
            raise ExportFailedError(
                f"ONNX Runtime GenAI's model builder failed: {lines[-1] if lines else proc.returncode}"
            )
        carried = carry_block_weights_onnx(out / path.name, blocks) if blocks and scheme == "8da4w" else {}
        config = json.loads((out / GENAI_CONFIG).read_text())
        config["model"]["context_length"] = int(max_context_len)
        config["search"]["max_length"] = int(max_context_len)
        (out / GENAI_CONFIG).write_text(json.dumps(config, indent=4))
        for f in out.iterdir():
            shutil.move(str(f), path.parent / f.name)
    return {
        "exporter": "onnxruntime_genai.models.builder (CPU)",
        "scheme": scheme,
        "group_size": group_size if scheme == "8da4w" else None,
        "weights": f"MatMulNBits int4, block {group_size}, accuracy_level 4" if scheme == "8da4w" else "float32",
        "head_bits": (8 if carried.get("int8_head") else 4) if scheme == "8da4w" else None,
        "gguf_blocks": carried,
        "max_context_len": int(max_context_len),
        "seconds": round(time.perf_counter() - t0, 1),
    }


#: ONNX Runtime GenAI builder's int4 linear nodes: ``/model/layers.{i}/{attn|mlp}/{proj}/MatMul_Q4``.
_BUILDER_LINEAR = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul_Q4$")
#: Builder projection -> the Hugging Face projections stacked in it (rows in this order).
_BUILDER_PROJ = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "q_proj": ("self_attn.q_proj",),
    "k_proj": ("self_attn.k_proj",),
    "v_proj": ("self_attn.v_proj",),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "gate_proj": ("mlp.gate_proj",),
    "up_proj": ("mlp.up_proj",),
    "down_proj": ("mlp.down_proj",),
}


def carry_block_weights_onnx(path: Path, blocks: dict[str, Any]) -> dict[str, int]:
    """Replace the int4 weights the GenAI builder re-quantized in the ONNX decoder at ``path`` (weights in
    ``<path>.data``) by a GGUF file's own blocks, exactly (see :mod:`edgelm.gguf_weights`).

    ``blocks``: Hugging Face weight name -> an object with ``bits`` (4 or 8), ``codes`` int8 [out, in],
    ``scales`` float32 [out, in / 32] and ``offsets`` float32 [out, in / 32] or None. A 4-bit linear becomes
    ``MatMulNBits`` with the GGUF codes and scales (ONNX Runtime's default zero point 8 makes
    ``(q + 8 - 8) * d``); block offsets add ``MatMul(ReduceSum(x per block of 32), offsets^T)`` to its
    output. An 8-bit head (``Q8_0``) becomes an 8-bit ``MatMulNBits`` and the embedding that shares it an
    8-bit ``GatherBlockQuantized``. A node whose weights are not all in ``blocks``, or carry a low-rank update
    (``lowrank``, a merged LoRA: not written in ONNX), is left as the builder made it. Returns the counts
    ``{"int4": n, "int4_offsets": n, "int8_head": 0 or 1}``.

    Raises ExportFailedError when the model cannot be read or written.
    """
    onnx = require("onnx", "onnx", "to rewrite ONNX decoder weights")
    from onnx import helper, numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportFailedError(f"could not read the ONNX decoder {path.name}: {exc}") from None
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    block = 32

    def stacked(names: list[str]):
        parts = [blocks.get(n) for n in names]
        if (
            any(p is None or getattr(p, "lowrank", None) is not None for p in parts)
            or len({p.bits for p in parts}) != 1
        ):
            return None
        codes = np.concatenate([p.codes for p in parts])
        scales = np.concatenate([p.scales for p in parts])
        offs = [p.offsets for p in parts]
        offsets = (
            None
            if all(o is None for o in offs)
            else np.concatenate(
                [o if o is not None else np.zeros_like(p.scales) for o, p in zip(offs, parts, strict=True)]
            )
        )
        return parts[0].bits, codes, scales, offsets

    def set_init(name: str, array: np.ndarray) -> None:
        new = numpy_helper.from_array(array, name)
        if name in inits:
            inits[name].CopyFrom(new)
        else:
            graph.initializer.append(new)
            inits[name] = graph.initializer[-1]

    def attr(node, name, value) -> None:
        for a in node.attribute:
            if a.name == name:
                a.CopyFrom(helper.make_attribute(name, value))
                return
        node.attribute.append(helper.make_attribute(name, value))

    counts = {"int4": 0, "int4_offsets": 0, "int8_head": 0}
    head_weight = None  # the 8-bit head's weight initializer, once written
    new_nodes: list[tuple[int, list]] = []
    head_name = "lm_head.weight" if "lm_head.weight" in blocks else "model.embed_tokens.weight"
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or len(node.input) != 3:  # builder nodes: no zero points, no g_idx
            continue
        m = _BUILDER_LINEAR.match(node.name)
        is_head = node.name == "/lm_head/MatMul_Q4"
        if m and m.group(3) in _BUILDER_PROJ:
            names = [f"model.layers.{m.group(1)}.{p}.weight" for p in _BUILDER_PROJ[m.group(3)]]
        elif is_head:
            names = [head_name]
        else:
            continue
        found = stacked(names)
        if found is None:
            continue
        bits, codes, scales, offsets = found
        n_out, k = codes.shape
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("N") != n_out or attrs.get("K") != k or attrs.get("block_size") != block:
            continue
        if bits == 4:
            u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n_out, k // block, block)
            packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # element 2j low nibble, 2j+1 high
        elif is_head:
            packed = (codes.astype(np.int16) + 128).astype(np.uint8).reshape(n_out, k // block, block)
            head_weight = node.input[1]
        else:
            continue
        set_init(node.input[1], packed)
        set_init(node.input[2], scales.astype(np.float32))
        attr(node, "bits", bits)
        counts["int4" if bits == 4 else "int8_head"] += 1
        if offsets is not None:
            # y = MatMulNBits(x) + MatMul(ReduceSum(reshape(x, [.., K/32, 32]), -1), offsets^T)
            stem, y = node.name, node.output[0]
            main = f"{stem}/int4_output"
            node.output[0] = main
            set_init(f"{stem}.block_shape", np.array([0, 0, k // block, block], dtype=np.int64))
            set_init(f"{stem}.block_axis", np.array([-1], dtype=np.int64))
            set_init(f"{stem}.block_offsets", np.ascontiguousarray(offsets.T.astype(np.float32)))
            new_nodes.append(
                (
                    index,
                    [
                        helper.make_node("Reshape", [node.input[0], f"{stem}.block_shape"], [f"{stem}/blocks"]),
                        helper.make_node(
                            "ReduceSum", [f"{stem}/blocks", f"{stem}.block_axis"], [f"{stem}/block_sums"], keepdims=0
                        ),
                        helper.make_node("MatMul", [f"{stem}/block_sums", f"{stem}.block_offsets"], [f"{stem}/offset"]),
                        helper.make_node("Add", [main, f"{stem}/offset"], [y]),
                    ],
                )
            )
            counts["int4_offsets"] += 1
    if head_weight is not None:  # a tied embedding reads the head's weights through a Reshape: 8-bit rows now
        producer = {out: n for n in graph.node for out in n.output}
        for node in graph.node:
            ref = producer.get(node.input[0]) if node.op_type == "GatherBlockQuantized" else None
            if ref is not None and ref.op_type == "Reshape" and ref.input[0] == head_weight:
                set_init(f"{ref.name}.shape8", np.array(blocks[head_name].codes.shape, dtype=np.int64))
                ref.input[1] = f"{ref.name}.shape8"
                attr(node, "bits", 8)
    for index, nodes in reversed(new_nodes):
        for offset, extra in enumerate(nodes, start=1):
            graph.node.insert(index + offset, extra)
    data = path.with_name(path.name + ".data")
    try:
        data.unlink(missing_ok=True)
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    except Exception as exc:
        raise ExportFailedError(f"could not write the ONNX decoder {path.name}: {exc}") from None
    return counts


def onnx_files(path: Path) -> list[Path]:
    """The files an ONNX decoder at ``path`` needs beside it: external weights and GenAI's config."""
    path = Path(path)
    return [p for p in (path.with_name(path.name + ".data"), path.with_name(GENAI_CONFIG)) if p.is_file()]


class DecoderSession(Protocol):
    """A generative artifact loaded for step-wise decoding.

    Attributes:
        vocab_size: logits per position.
        max_context: KV-cache positions; ``pos + len(tokens)`` may not exceed it.
        full_logits: whether :meth:`forward` returns every position's logits (else only the last).
        bos_id / eos_ids: the model's special ids as the artifact records them (None / [] if it does not).
    """

    vocab_size: int
    max_context: int
    full_logits: bool
    bos_id: int | None
    eos_ids: list[int]

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Feed int64 [n] ``tokens`` at positions ``pos .. pos+n-1`` (the cache keeps positions < ``pos``)
        and return float32 logits [n, vocab] (``full_logits``) or [1, vocab] (the last position)."""
        ...


def _check_window(session: DecoderSession, tokens: np.ndarray, pos: int) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(tokens) == 0:
        raise ValueError("no tokens to feed")
    if pos < 0 or pos + len(tokens) > session.max_context:
        raise ValueError(
            f"positions {pos}..{pos + len(tokens) - 1} do not fit the context of {session.max_context} tokens"
        )
    return tokens


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send the runtimes' log lines (ExecuTorch's cpuinfo and thread-pool lines, written to fd 2 and, through
    pybind, to ``sys.stderr``; LiteRT's accelerator registry, through buffered C stdio, flushed here before
    fd 2 comes back) to /dev/null while the block runs; Python exceptions still propagate."""
    sys.stderr.flush()
    saved, saved_py = os.dup(2), sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with open(os.devnull, "w") as sink:
            sys.stderr = sink
            try:
                yield
            finally:
                sys.stderr = saved_py
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C stdio buffers still bound for /dev/null
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class ExecuTorchDecoder:
    """A ``.pte`` decoder in ExecuTorch's Python runtime (XNNPACK, quantized and LLM custom kernels).
    ``threads`` sets XNNPACK's thread pool before the program is loaded."""

    full_logits = False

    def __init__(self, path: Path, threads: int | None = None):
        from exporters.executorch import open_program

        path = check_artifact_file(path, ".pte", "ExecuTorch")
        require("executorch.extension.llm.custom_ops.custom_ops", "executorch", "for the LLM kernels (SDPA, KV cache)")
        try:
            with quiet_stderr():
                self._torch, program = open_program(path, threads)
                names = set(program.method_names)
                meta = {
                    n: program.load_method(n).execute([]) for n in names if n.startswith("get_") or n == "use_kv_cache"
                }
                self._method = program.load_method("forward")
        except ArtifactLoadError:
            raise
        except Exception as exc:
            raise ArtifactLoadError(f"ExecuTorch could not load {path}: {exc}") from exc
        if not meta.get("use_kv_cache", [False])[0]:
            raise ArtifactLoadError(f"{path.name} is not a decoder with a KV cache (no use_kv_cache method)")
        self.max_context = int(meta["get_max_context_len"][0])
        #: the longest call the program takes (its ``get_max_seq_len``; edgelm's exports say the bound, one
        #: less than the export's ``max_seq_len``); longer feeds are split
        self.max_seq = int(meta["get_max_seq_len"][0]) if "get_max_seq_len" in meta else self.max_context
        self.bos_id = int(meta["get_bos_id"][0]) if "get_bos_id" in meta else None
        self.eos_ids = [int(x) for x in meta.get("get_eos_ids", [])]
        self.vocab_size = int(meta["get_vocab_size"][0]) if "get_vocab_size" in meta else 0

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        torch = self._torch
        tokens = _check_window(self, tokens, pos)
        for start in range(0, len(tokens), self.max_seq):  # as ExecuTorch's LLM runner splits a long prompt
            chunk = np.ascontiguousarray(tokens[start : start + self.max_seq])
            out = self._method.execute([torch.from_numpy(chunk[None, :]), torch.tensor([pos + start])])[0]
        logits = out.numpy().astype(np.float32, copy=True)
        return logits.reshape(-1, logits.shape[-1])[-1:]


class OnnxDecoder:
    """An ONNX decoder (ONNX Runtime GenAI's layout) in a plain ``onnxruntime`` session: the KV cache is kept
    here between calls as numpy arrays (``past_key_values.{i}.*`` in, ``present.{i}.*`` out)."""

    full_logits = True

    def __init__(self, path: Path, threads: int | None = None):
        from exporters.onnx import DELEGATE, session_options

        path = check_artifact_file(path, ".onnx", "ONNX")
        ort = require("onnxruntime", "onnxruntime", "to run .onnx artifacts")
        try:
            self._session = ort.InferenceSession(str(path), session_options(ort, threads), providers=[DELEGATE])
            config = json.loads(path.with_name(GENAI_CONFIG).read_text())["model"]
        except Exception as exc:
            raise ArtifactLoadError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.max_context = int(config["context_length"])
        self.vocab_size = int(config["vocab_size"])
        self.bos_id = config.get("bos_token_id")
        eos = config.get("eos_token_id")
        self.eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None]
        inputs = {i.name: i for i in self._session.get_inputs()}
        self._past = sorted(n for n in inputs if n.startswith("past_key_values."))
        self._present = [n.replace("past_key_values.", "present.") for n in self._past]
        self._has_positions = "position_ids" in inputs
        self._cache: list[np.ndarray] = []
        self._len = 0
        dec = config["decoder"]
        self._kv_empty = np.zeros((1, int(dec["num_key_value_heads"]), 0, int(dec["head_size"])), dtype=np.float32)

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        tokens = _check_window(self, tokens, pos)
        if pos > self._len:
            raise ValueError(f"position {pos} skips the cache, which holds {self._len} positions")
        if pos == 0 or not self._cache:
            past = [self._kv_empty] * len(self._past)
        else:
            past = [c[:, :, :pos, :] for c in self._cache]
        n = len(tokens)
        feeds = {"input_ids": tokens[None, :], "attention_mask": np.ones((1, pos + n), dtype=np.int64)}
        if self._has_positions:
            feeds["position_ids"] = np.arange(pos, pos + n, dtype=np.int64)[None, :]
        feeds.update(dict(zip(self._past, past, strict=True)))
        outs = self._session.run(["logits", *self._present], feeds)
        self._cache, self._len = list(outs[1:]), pos + n
        return outs[0][0].astype(np.float32, copy=False)


def load_decoder(path: Path, threads: int | None = None) -> DecoderSession:
    """Open a generative artifact (``.pte``, ``.onnx`` or ``.tflite``) for step-wise decoding.

    Raises ArtifactLoadError (missing, corrupt, not a decoder, unknown suffix) or RuntimeNotInstalledError.
    """
    path = Path(path)
    if path.suffix == ".pte":
        return ExecuTorchDecoder(path, threads)
    if path.suffix == ".onnx":
        return OnnxDecoder(path, threads)
    if path.suffix == ".tflite":
        from exporters.decoder_tflite import LiteRTDecoder

        return LiteRTDecoder(path, threads)
    raise ArtifactLoadError(f"{path.name}: generative artifacts are .pte, .onnx or .tflite files")


def runtime_versions(path: Path) -> dict[str, str]:
    """``{package: version}`` of the runtime that runs a decoder at ``path``."""
    names = {
        ".pte": ("executorch", "torch"),
        ".onnx": ("onnxruntime", "onnxruntime-genai"),
        ".tflite": ("ai-edge-litert", "litert-torch"),
    }.get(Path(path).suffix, ())
    return package_versions(*names)
