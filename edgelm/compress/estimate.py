"""Cost model: parameters, MACs, weight bytes, activation memory, and estimated latency and peak RAM on a
target, computed from the model's structure and the profile's hardware figures before any export.

Counting (batch 1, ``S`` tokens, per encoder layer with ``H`` heads of size ``dh``, hidden ``d``, FFN ``I``):

- Linear MACs: ``S · in · out`` for every encoder Linear (query/key/value, attention output, FFN), and
  ``in · out`` for the pooler and classifier (one token);
- attention MACs: ``2 · S² · H · dh`` (scores and the weighted sum), always float;
- weight bytes: Linear weights at the scheme's bits (int8: 1 byte + a 4-byte scale per output channel;
  int4: 0.5 byte + a 4-byte scale per group), the word-embedding table at 8 bits where the scheme stores it
  so (4-byte row scales), everything else float32;
- activation bytes: the largest live set of one layer in float32: ``4 · (5 · S · d + H · S² + S · I)``.

Latency is a roofline estimate: ``max(compute, memory) + 0.2 ms`` where compute is the Linear MACs at the
int8 or fp32 rate (one MAC = 2 ops) plus attention at the fp32 rate, divided by ``0.8 · threads`` for more than one
thread (capped at the core count); memory is the weight bytes over ``hardware.memory_bandwidth_gbs``. Peak
RAM is weight bytes + activations + the runtime's own footprint (the format plug-in's ``runtime_overhead_mb``;
:data:`PYTORCH_OVERHEAD_MB`). These are estimates for planning; the export report puts them beside the
measurement.

Rates (:func:`int8_rate`): ``hardware.cpu_gflops_fp32`` is one big core's sustained fp32 GEMM rate;
``hardware.cpu_gops_int8`` its int8 rate with an int8 dot-product instruction (Arm ``dotprod``/``i8mm``, x86
VNNI or AMX). A CPU whose ``isa_features`` list none multiplies int8 with widening instructions (NEON SMLAL,
AVX2 VPMADDUBSW) and gets :data:`NO_DOT_PRODUCT_SHARE` of it; each format's int8 path then reaches its
plug-in's ``int8_efficiency`` share for ``int8_dynamic`` (ONNX's per-token quantization runs as separate ops).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import exporters
from edgelm import schemes

#: Resident memory of each runtime itself, MB (library + arena), added to the peak-RAM estimate.
#: (The formats' own figures are their plug-ins' ``runtime_overhead_mb``; this is PyTorch eager's.)
PYTORCH_OVERHEAD_MB = 300.0

#: ISA features (hostinfo's and the profiles' names) that give int8 dot products: 4 int8 products summed
#: into an int32 lane per instruction (i8mm: a 2x8 by 8x2 int8 matrix product).
INT8_DOT_PRODUCT = ("dotprod", "i8mm", "avx512_vnni", "avx_vnni", "amx_int8")
#: Share of ``cpu_gops_int8`` int8 GEMMs reach on a CPU without any :data:`INT8_DOT_PRODUCT` feature. Measured
#: (issue 13): MiniLM int8 over PyTorch fp32 was 1.4-2.7x on an AVX2-only AMD EPYC against 4.3-6.7x on a VNNI
#: Xeon, the same artifacts and inputs: about 0.4 of the speed-up.
NO_DOT_PRODUCT_SHARE = 0.4


@dataclass
class Estimate:
    """Cost of one model under one scheme on one device.

    Attributes:
        parameters: total parameters.
        encoder_parameters: parameters in the encoder layers.
        macs: multiply-accumulates per inference at ``seq_len`` (batch 1).
        weight_mb: stored weight size, MB (10^6 bytes) — about the artifact size.
        activation_mb: largest live activation set, MB.
        latency_ms: estimated latency on the target, ms.
        peak_ram_mb: estimated peak RAM on the target, MB.
    """

    device: str
    scheme: str
    format: str
    seq_len: int
    threads: int
    parameters: int
    encoder_parameters: int
    macs: int
    weight_mb: float
    activation_mb: float
    latency_ms: float
    peak_ram_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def _structure(wrapper: Any) -> dict:
    import torch

    from edgelm.compress.pruning import encoder_layers

    layers = encoder_layers(wrapper)
    enc_ids = {id(p) for layer in layers for p in layer.parameters()}
    linears_enc, linears_head = [], []
    enc_modules = {id(m) for layer in layers for m in layer.modules()}
    for m in wrapper.modules():  # each module once, even when the wrapper reaches it by two names
        if isinstance(m, torch.nn.Linear):
            (linears_enc if id(m) in enc_modules else linears_head).append((m.in_features, m.out_features))
    params = {id(p): p.numel() for p in wrapper.parameters()}
    emb = wrapper.base.embeddings.word_embeddings.weight
    attn = []
    for layer in layers:
        sa = layer.attention.self
        heads = sa.query.out_features // sa.attention_head_size
        attn.append((heads, sa.attention_head_size, layer.intermediate.dense.out_features))
    return {
        "parameters": sum(params.values()),
        "encoder_parameters": sum(v for k, v in params.items() if k in enc_ids),
        "linears_enc": linears_enc,
        "linears_head": linears_head,
        "attn": attn,
        "hidden": emb.shape[1],
        "vocab_params": emb.numel(),
        "vocab_rows": emb.shape[0],
    }


def int8_rate(hardware: dict, fmt: str = "pytorch", scheme: str = "int8_dynamic") -> float:
    """Sustained int8 GEMM rate of one big core, GOP/s, for ``fmt``'s ``scheme`` kernels on ``hardware`` (a
    profile's ``[hardware]`` as a dict): ``cpu_gops_int8``, times :data:`NO_DOT_PRODUCT_SHARE` when
    ``isa_features`` has no int8 dot product, times the format plug-in's ``int8_efficiency`` for
    ``int8_dynamic`` (the scheme whose kernels differ between formats: ONNX scales per token in separate ops)."""
    rate = float(hardware["cpu_gops_int8"])
    if not set(hardware.get("isa_features") or ()) & set(INT8_DOT_PRODUCT):
        rate *= NO_DOT_PRODUCT_SHARE
    if fmt != "pytorch" and scheme == "int8_dynamic":
        rate *= float(getattr(exporters.get(fmt), "int8_efficiency", 1.0))
    return rate


def estimate(
    wrapper: Any,
    recipe: Any,
    *,
    scheme: str = "fp32",
    fmt: str = "pytorch",
    seq_len: int | None = None,
    threads: int | None = None,
    embedding_bits: int | None = None,
    group_size: int = 32,
) -> Estimate:
    """Estimate the cost of ``wrapper`` (an edgelm model wrapper) on the device of ``recipe`` (a
    :class:`~edgelm.recipe.Recipe`: its ``hardware`` figures, ``seq_len`` and ``threads``).

    Args:
        scheme: a quantization scheme (``fp32``, ``fp16``, ``int8_dynamic``, ``int8_static``, ``8da4w``,
            ``int4_weight_only``).
        fmt: ``onnx``, ``executorch``, ``tflite`` or ``pytorch``: its runtime overhead and int8 efficiency
            (:func:`int8_rate`).
        seq_len / threads: default the recipe's (tokens, CPU threads).
        embedding_bits: 8 to count the word-embedding table at 8 bits (default: 8 for quantized schemes).
    Raises:
        RecipeError: an unknown scheme.
    """
    sch = schemes.get(scheme)  # bits per weight and int8 kernels come from the scheme table
    s = _structure(wrapper)
    S = int(seq_len or recipe.seq_len)
    n_threads = int(threads or recipe.threads)
    if embedding_bits is None:
        embedding_bits = sch.embedding_bits
    lin_macs = sum(S * i * o for i, o in s["linears_enc"]) + sum(i * o for i, o in s["linears_head"])
    attn_macs = sum(2 * S * S * h * dh for h, dh, _ in s["attn"])
    bits = sch.weight_bits
    lin_weights = sum(i * o for i, o in s["linears_enc"] + s["linears_head"])
    if bits == 8:
        scale_bytes = 4 * sum(o for _, o in s["linears_enc"] + s["linears_head"])
    elif bits == 4:
        scale_bytes = 4 * lin_weights // group_size
    else:
        scale_bytes = 0
    lin_bytes = lin_weights * bits / 8 + scale_bytes
    if embedding_bits == 8:
        emb_bytes = s["vocab_params"] + 4 * s["vocab_rows"]
    else:
        emb_bytes = s["vocab_params"] * (sch.weight_bits // 8 if sch.weight_bits >= 16 else 4)  # float table
    other_params = s["parameters"] - lin_weights - s["vocab_params"]
    weight_bytes = lin_bytes + emb_bytes + other_params * 4
    d = s["hidden"]
    act_bytes = max((4 * (5 * S * d + h * S * S + S * ffn) for h, _, ffn in s["attn"]), default=0)
    hw = recipe.hardware
    lin_rate = int8_rate(hw, fmt, scheme) if sch.int8_compute else hw["cpu_gflops_fp32"]
    parallel = 1.0 if n_threads <= 1 else 0.8 * min(n_threads, hw["cpu_cores"])
    compute_ms = (2 * lin_macs / (lin_rate * 1e9) + 2 * attn_macs / (hw["cpu_gflops_fp32"] * 1e9)) / parallel * 1e3
    memory_ms = weight_bytes / (hw["memory_bandwidth_gbs"] * 1e9) * 1e3
    latency = max(compute_ms, memory_ms) + 0.2
    overhead = PYTORCH_OVERHEAD_MB if fmt == "pytorch" else exporters.get(fmt).runtime_overhead_mb
    peak = (weight_bytes + act_bytes) / 1e6 + overhead
    return Estimate(
        device=recipe.device,
        scheme=scheme,
        format=fmt,
        seq_len=S,
        threads=n_threads,
        parameters=int(s["parameters"]),
        encoder_parameters=int(s["encoder_parameters"]),
        macs=int(lin_macs + attn_macs),
        weight_mb=weight_bytes / 1e6,
        activation_mb=act_bytes / 1e6,
        latency_ms=latency,
        peak_ram_mb=peak,
    )


def estimate_schemes(model: str, recipe: Any, scheme_names: list[str] | None = None) -> list[Estimate]:
    """What ``edgelm estimate`` prints: the cost of ``model`` (``"default"`` or a checkpoint directory) on
    the recipe's device under each of ``scheme_names`` (default: fp32 and the recipe's schemes), at the
    recipe's sequence length and threads, on every runtime that would run it: PyTorch eager for fp32, and
    each of the recipe's formats that can export the scheme (ONNX Runtime where none of them can).
    Raises RecipeError for an unknown scheme (before the model is loaded) and ModelError for a bad model."""
    from edgelm.models import load_model

    names = scheme_names or list(dict.fromkeys(["fp32", *(p.quant.scheme for p in recipe.plans)]))
    for name in names:
        schemes.get(name)
    loaded = load_model(model)
    formats = [p.format for p in recipe.plans]

    def runtimes(scheme: str) -> list[str]:
        if scheme == "fp32":
            return ["pytorch"]
        return [f for f in formats if scheme in exporters.get(f).schemes] or ["onnx"]

    return [estimate(loaded.module, recipe, scheme=s, fmt=f) for s in names for f in runtimes(s)]


@dataclass(frozen=True)
class DecoderEstimate:
    """Cost model of a generative decoder on a device (batch 1).

    Counting, for ``L`` layers, hidden ``d``, ``Hkv`` KV heads of size ``dh``, context ``C`` tokens:

    - KV cache: ``2 · L · Hkv · dh · C`` float32 values (keys and values of every position);
    - prefill: one MAC per weight per prompt token (``prefill_gmacs_per_token``, the linears and the output
      head; attention over the prompt is left out);
    - decode is memory-bound: each new token reads every weight once and, on average, the KV cache up to half
      the context, so ``decode tokens/s = bandwidth / (weight bytes + KV bytes / 2)`` (weight bytes: the
      artifact's size).

    Attributes:
        kv_cache_mb: the KV cache at the context length, MB.
        prefill_gmacs_per_token: GMAC per prompt token.
        bandwidth_gbs: the profile's memory bandwidth, GB/s.
    """

    kv_cache_mb: float
    prefill_gmacs_per_token: float
    bandwidth_gbs: float
    prefill_gops_rate: float

    def for_size(self, weight_bytes: int, gathered_bytes: int = 0) -> dict:
        """The estimate for an artifact of ``weight_bytes``, of which ``gathered_bytes`` are an embedding table
        a decode step reads one row of (see :func:`decoder_weight_bytes`): ``weights_mb``, ``kv_cache_mb``,
        ``ram_mb`` (weights + KV cache), ``decode_tokens_per_s`` and ``prefill_tokens_per_s`` (one big core at
        the int8 rate)."""
        per_token = weight_bytes - gathered_bytes + self.kv_cache_mb * 1e6 / 2
        return {
            "weights_mb": weight_bytes / 1e6,
            "kv_cache_mb": self.kv_cache_mb,
            "ram_mb": weight_bytes / 1e6 + self.kv_cache_mb,
            "decode_tokens_per_s": self.bandwidth_gbs * 1e9 / per_token,
            "prefill_tokens_per_s": self.prefill_gops_rate / (2 * self.prefill_gmacs_per_token),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def _decoder_shape(config: dict) -> dict:
    """A Llama-family decoder's sizes from its Hugging Face config: ``hidden``, ``layers``, ``kv_heads``,
    ``head_dim``, ``vocab`` and ``linear``, the weights of every linear layer and the output head (one MAC per
    weight per token)."""
    d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    dh = int(config.get("head_dim") or d // heads)
    inter, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
    per_layer = d * heads * dh + 2 * d * kv_heads * dh + heads * dh * d + 3 * d * inter
    return {
        "hidden": d,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": dh,
        "vocab": vocab,
        "linear": layers * per_layer + d * vocab,
        # output channels (rows) of every linear and the head: one per-channel scale each
        "channels": layers * (2 * heads * dh + 2 * kv_heads * dh + 3 * inter) + vocab,
    }


def decoder_estimate(
    hardware: dict, config: dict, context_length: int, attention_layers: int | None = None
) -> DecoderEstimate:
    """:class:`DecoderEstimate` of a Llama-family decoder (``config``: its Hugging Face config as a dict) at
    ``context_length`` tokens on ``hardware`` (a profile's ``[hardware]``). ``attention_layers``: the layers
    that keep a KV cache (a hybrid RNN-Transformer's attention layers; default: all)."""
    shape = _decoder_shape(config)
    macs = shape["linear"]
    layers = shape["layers"] if attention_layers is None else attention_layers
    kv = 2 * layers * shape["kv_heads"] * shape["head_dim"] * context_length * 4
    return DecoderEstimate(
        kv_cache_mb=kv / 1e6,
        prefill_gmacs_per_token=macs / 1e9,
        bandwidth_gbs=float(hardware["memory_bandwidth_gbs"]),
        prefill_gops_rate=int8_rate(hardware, "pytorch", "8da4w"),
    )


#: A LiteRT decoder's flatbuffer records (op and tensor entries with their names) per layer and signature,
#: bytes: measured 43.8 kB on SmolLM2-135M (30 layers, 4 signatures) and 48.7 kB on a 2-layer test model.
TFLITE_RECORD_BYTES = 44_000


def decoder_weight_bytes(
    config: dict,
    scheme: str,
    group_size: int = 32,
    fmt: str = "executorch",
    gguf_type: str | None = None,
    context: int = 0,
) -> tuple[int, int]:
    """Bytes of a Llama-family decoder's weights as ``scheme`` stores them in ``fmt``, and how many of them are
    an embedding table apart from the output head (a decode step reads one row of it, not all of it).

    - ``fp32``: 4 bytes per weight; a tied output head shares the embedding table.
    - ``8da4w``: the linears at 4 bits plus one scale per group of ``group_size`` (2 bytes in ExecuTorch's
      torchao layout, 4 in ONNX's ``MatMulNBits``); the embedding table at 8 bits (ExecuTorch: a 4-byte scale
      per row; ONNX: one per block of 32). The output head: 4-bit like the linears, except when the weights
      come from a GGUF (``gguf_type``: llama.cpp keeps its tied embedding/head in Q8_0, and edgelm carries it
      as an 8-bit head): ExecuTorch holds a separate 8-bit head with a scale per channel, ONNX shares the 8-bit
      table between the ``GatherBlockQuantized`` embedding and the head. A ``Q4_1`` GGUF also carries one
      float32 block offset per group of every linear (``edgelm.gguf_weights``).
    - LiteRT (``tflite``, litert-torch's recipes): every weight, the embedding table included, is re-quantized
      (a GGUF's blocks are not carried): ``8da4w`` to int4 blocks of ``group_size`` with a float16 scale
      each; ``int8_dynamic`` to int8 per channel, whose float32 scale and int64 zero point sit in the tensor
      records of every signature (12 bytes per channel and signature). A tied table serves the lookup and
      the head. litert-torch also stores a float32 causal mask of ``context``
      x ``context`` positions (4 MB at 1,024) and, per layer and signature (``prefill_<N>`` for each N in
      32, 128, 512 up to ``context``, and ``decode``), about :data:`TFLITE_RECORD_BYTES` of flatbuffer op and
      tensor records (``context`` = 0 leaves both out). Checked against SmolLM2-135M at 1,024: ``8da4w``
      85.2 MB measured, ``int8_dynamic`` 153.6 MB, each within 1%.

    Returns ``(total bytes, bytes of an embedding table separate from the head)``. Norms are float32. Checked
    against SmolLM2-135M (Q4_1 GGUF): 130.1 / 111.6 MB estimated, 131.6 / 114.1 MB measured (.pte / .onnx).
    """
    shape = _decoder_shape(config)
    d, layers, vocab, linear = shape["hidden"], shape["layers"], shape["vocab"], shape["linear"]
    table, norms = vocab * d, 4 * (2 * layers + 1) * d
    tied = bool(config.get("tie_word_embeddings"))
    if scheme == "fp32":
        return 4 * (linear + (0 if tied else table)) + norms, 0 if tied else 4 * table  # linear has the head
    body = linear - table  # every linear but the output head
    if fmt == "tflite" and scheme != "fp32":
        from exporters.decoder_tflite import prefill_lengths

        signatures = 1 + len(prefill_lengths(context)) if context else 0
        records = TFLITE_RECORD_BYTES * layers * signatures + 4 * context * context
        if scheme == "int8_dynamic":  # a float32 scale and an int64 zero point per channel, in every signature
            emb = 0 if tied else table + 12 * vocab * signatures
            return linear + emb + norms + records + 12 * shape["channels"] * signatures, emb
        int4 = linear // 2 + (linear // group_size) * 2  # the head is the tied table, or a linear of its own
        emb = 0 if tied else table // 2 + (table // group_size) * 2
        return int4 + emb + norms + records, emb
    groups = body // group_size
    scale = 4 if fmt == "onnx" else 2
    four_bit = body // 2 + groups * scale + (4 * groups if gguf_type == "Q4_1" else 0)
    emb = table + (4 * (table // 32) if fmt == "onnx" else 4 * vocab)
    if gguf_type:  # 8-bit head
        head = 0 if (fmt == "onnx" and tied) else table + 4 * vocab
    else:
        head = table // 2 + (table // group_size) * scale
    return four_bit + emb + head + norms, emb if head else 0


def decoder_rows(
    recipe: Any, config: dict, gguf_type: str | None = None, scheme_names: list[str] | None = None
) -> list[dict]:
    """The device-class view of a generative model on one device (``recipe``: a
    :class:`edgelm.recipe.GenerationRecipe`): one row per scheme and runtime (``fp32`` on PyTorch, each of the
    profile's ``[llm]`` formats with its scheme), each with :meth:`DecoderEstimate.for_size`'s figures for the
    bytes :func:`decoder_weight_bytes` gives, plus ``scheme``, ``format`` and ``verdict``: ``"fits"``, or
    ``"no: "`` and what misses: ``RAM`` (weights + KV cache over ``[llm] ram_budget_mb``), ``file`` (over
    ``max_artifact_mb``), ``slow`` (decode under ``min_decode_tokens_per_s``).

    ``scheme_names`` (default: fp32 on PyTorch and each plan's own scheme) limits the rows to those schemes,
    on each format whose decoders take them.

    Raises:
        RecipeError: a scheme no decoder export takes.
    """
    from edgelm.errors import RecipeError

    est = decoder_estimate(recipe.hardware, config, recipe.context_length)
    group = recipe.plans[0].quant.group_size
    max_file = recipe.plans[0].gates.max_size_mb
    rows = []
    from edgelm.recipe import DECODER_SCHEMES

    known = sorted({s for schemes in DECODER_SCHEMES.values() for s in schemes})
    for name in scheme_names or []:
        if name not in known:
            raise RecipeError(f"generative models export as {', '.join(known)}, not {name!r}")
    pairs = [("fp32", "pytorch")] if not scheme_names or "fp32" in scheme_names else []
    for plan in recipe.plans:  # each format's own scheme, or the schemes asked for where the format takes them
        names = [plan.quant.scheme] if not scheme_names else [n for n in scheme_names if n != "fp32"]
        pairs += [(n, plan.format) for n in names if n in DECODER_SCHEMES[plan.format]]
    for scheme, fmt in pairs:
        total, gathered = decoder_weight_bytes(config, scheme, group, fmt, gguf_type, recipe.context_length)
        row = {"scheme": scheme, "format": fmt, **est.for_size(total, gathered)}
        problems = []
        if row["ram_mb"] > recipe.ram_budget_mb:
            problems.append("RAM")
        if fmt != "pytorch" and max_file and row["weights_mb"] > max_file:
            problems.append("file")
        if row["decode_tokens_per_s"] < recipe.min_decode_tokens_per_s:
            problems.append("slow")
        row["verdict"] = "fits" if not problems else "no: " + ", ".join(problems)
        rows.append(row)
    return rows


def fastest_fitting(rows: list[dict]) -> dict:
    """Of :func:`decoder_rows`, the fastest exported artifact (not the fp32 PyTorch row, unless it is the only
    one) whose verdict is ``fits``; the fastest one when none fits."""
    rows = [r for r in rows if r["format"] != "pytorch"] or rows
    return max(rows, key=lambda r: (r["verdict"] == "fits", r["decode_tokens_per_s"]))
