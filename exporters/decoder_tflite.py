"""Generative decoders as LiteRT (``.tflite``) models: litert-torch's generative API to export, LiteRT's
interpreter to run.

Export (:func:`export_tflite`, torch side, in a child process so the converter's memory and log lines stay
out of the caller): a Llama-family Hugging Face checkpoint (llama, mistral, qwen2, qwen3) is rebuilt from
litert-torch's generative layers (``litert_torch.generative.utilities.model_builder.DecoderOnlyModel``:
RMSNorm, grouped-query attention with RoPE, gated SiLU feed-forward), its weights loaded with litert-torch's
``ModelLoader`` (Hugging Face tensor names), and converted with ``converter.convert_to_tflite`` into one
multi-signature model: ``prefill_<N>`` for each prompt length N and ``decode``. Every signature takes
``tokens`` int32 [1, N] (decode: [1, 1]), ``input_pos`` int32 [N] and the KV cache (``kv_cache_k_<i>`` /
``kv_cache_v_<i>`` float32 [1, context, kv_heads, head_dim] per layer, the layout of litert-torch's
``KVCache``) and returns the updated cache and ``logits`` float32 [1, N, vocab] (prefill logits are kept so
that perplexity needs no extra step). Quantization is litert-torch's generative recipes (see
:func:`_quant_config`): ``8da4w`` = int4 weights in blocks of 32 or 128 with activations quantized to int8 on
the fly (``full_dynamic_recipe``); ``int8_dynamic`` = the same with int8 per-channel weights; ``fp32`` = no
quantization. A companion ``<file>.json`` records what the flatbuffer does
not: the BOS/EOS ids, vocabulary, context and prefill lengths.

Run (:class:`LiteRTDecoder`, numpy + ``ai_edge_litert``, no torch): the KV cache stays in LiteRT's tensor
buffers between calls (updated in place); a prompt of n tokens runs through the smallest ``prefill_<N>`` with N >= n that fits the
context (padded; the causal mask keeps the padding out of every real position's attention and later steps
overwrite its cache rows), longer ones in chunks, one token through ``decode``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (
    ArtifactLoadError,
    ExportFailedError,
    RuntimeNotInstalledError,
    UnsupportedQuantError,
    check_artifact_file,
    require_installed,
)
from exporters.decoder import _check_window, quiet_stderr

#: Block sizes litert-torch's int4 recipes take for ``8da4w`` (``BLOCKWISE_32`` / ``BLOCKWISE_128``).
GROUP_SIZES = (32, 128)
#: Schemes a LiteRT decoder export takes: int4 block-wise or int8 per-channel weights (both with int8 dynamic
#: activations: litert-torch's ``full_dynamic_recipe``), or float32.
SCHEMES = ("8da4w", "int8_dynamic", "fp32")
#: Prompt lengths that get a ``prefill_<N>`` signature (those up to the context length).
PREFILL_LENGTHS = (32, 128, 512)
#: Architectures litert-torch's decoder-only builder reproduces (Hugging Face ``model_type``).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def config_path(path: Path) -> Path:
    """The companion JSON of a ``.tflite`` decoder (BOS/EOS ids, vocabulary, context, prefill lengths)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def prefill_lengths(context: int) -> list[int]:
    """The ``prefill_<N>`` lengths exported for a KV cache of ``context`` positions (at least one)."""
    return [n for n in PREFILL_LENGTHS if n <= context] or [context]


def export_tflite(
    hf_dir: Path,
    path: Path,
    *,
    scheme: str = "8da4w",
    group_size: int = 32,
    max_context_len: int = 512,
    bos_id: int | None = None,
    eos_ids: list[int] | None = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Export the Hugging Face checkpoint in ``hf_dir`` (float32 safetensors + config.json) to the LiteRT
    decoder ``path`` (and its companion :func:`config_path`), with a KV cache of ``max_context_len`` positions.

    Raises UnsupportedQuantError (a scheme other than 8da4w/fp32, a group size litert-torch has no recipe
    for), RuntimeNotInstalledError (litert-torch), ExportFailedError (an architecture litert-torch's builder
    does not reproduce, a conversion error, over ``timeout_s`` seconds).
    """
    if scheme not in SCHEMES:
        raise UnsupportedQuantError(f"LiteRT decoders export as {', '.join(SCHEMES)}, not {scheme!r}")
    if scheme == "8da4w" and group_size not in GROUP_SIZES:
        raise UnsupportedQuantError(
            f"LiteRT's int4 block-wise recipes use blocks of {' or '.join(map(str, GROUP_SIZES))}, not {group_size}: "
            "set [llm] group_size in the profile to one of these"
        )
    require_installed(("litert_torch", "litert-torch"), purpose="to export LiteRT decoders")
    path = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgelm-litert-") as tmp:
        cmd = [sys.executable, "-m", "exporters.decoder_tflite", str(hf_dir), str(path), "--tmp", tmp]
        cmd += ["--scheme", scheme, "--group-size", str(group_size), "--context", str(max_context_len)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(Path(__file__).parents[1])
            )
        except subprocess.TimeoutExpired:
            raise ExportFailedError(f"litert-torch's conversion took over {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not path.is_file():
            lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if ln.startswith("edgelm-error:")), None)
            raise ExportFailedError(
                reason.removeprefix("edgelm-error: ")
                if reason
                else f"litert-torch's conversion failed: {lines[-1] if lines else proc.returncode}"
            )
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    meta = {
        "format": "litert-torch generative decoder",
        "context_length": int(max_context_len),
        "prefill_lengths": prefill_lengths(max_context_len),
        "vocab_size": int(hf_config["vocab_size"]),
        "bos_token_id": bos_id,
        "eos_token_id": list(eos_ids or []),
    }
    config_path(path).write_text(json.dumps(meta, indent=2))
    return {
        "exporter": "litert-torch generative API (convert_to_tflite)",
        "scheme": scheme,
        "group_size": group_size if scheme == "8da4w" else None,
        "weights": {
            "8da4w": f"int4 block {group_size}, dynamic int8 activations (full_dynamic_recipe)",
            "int8_dynamic": "int8 per channel, dynamic int8 activations (full_dynamic_recipe)",
        }.get(scheme, "float32"),
        "signatures": [f"prefill_{n}" for n in meta["prefill_lengths"]] + ["decode"],
        "max_context_len": int(max_context_len),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _model_config(cfg_mod, hf: dict, context: int):
    """litert-torch's ``ModelConfig`` for a Hugging Face Llama-family ``config.json``; raises ValueError for
    a model the builder does not reproduce."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"LiteRT decoders are built for {', '.join(FAMILIES)}, not {family!r}")
    if hf.get("sliding_window") and family == "mistral":
        raise ValueError("Mistral's sliding-window attention is not built by litert-torch's decoder-only model")
    if hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise ValueError("only gated SiLU feed-forward layers without bias are built")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    norm = cfg_mod.NormalizationConfig(type=cfg_mod.NormalizationType.RMS_NORM, epsilon=hf.get("rms_norm_eps", 1e-6))
    extra = {"query_norm_config": norm, "key_norm_config": norm} if family == "qwen3" else {}
    attn = cfg_mod.AttentionConfig(
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        rotary_base=theta,
        rotary_percentage=1.0,
        qkv_use_bias=family == "qwen2" or bool(hf.get("attention_bias")),
        qkv_transpose_before_split=True,
        qkv_fused_interleaved=False,  # q heads, then k heads, then v heads: Hugging Face's separate projections
        **extra,
    )
    ff = cfg_mod.FeedForwardConfig(
        type=cfg_mod.FeedForwardType.GATED,
        activation=cfg_mod.ActivationConfig(cfg_mod.ActivationType.SILU),
        intermediate_size=hf["intermediate_size"],
    )
    block = cfg_mod.TransformerBlockConfig(
        attn_config=attn, ff_config=ff, pre_attention_norm_config=norm, post_attention_norm_config=norm
    )
    return cfg_mod.ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        max_seq_len=context,
        embedding_dim=hf["hidden_size"],
        block_configs=block,
        final_norm_config=norm,
        lm_head_share_weight_with_embedding=bool(hf.get("tie_word_embeddings", False)),
    )


def _import_generative():
    """Import litert-torch's generative modules. Its LoRA layer imports TensorFlow's generated flatbuffer
    schema (used only to read LoRA weights from a ``.tflite``); LiteRT ships the same generated module, which
    stands in for it during the import so TensorFlow (600 MB) is not needed."""
    import types

    import ai_edge_litert.schema_py_generated as schema
    import torch._dynamo  # noqa: F401  (it probes for TensorFlow at import: before the stand-in exists)

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    added = [n for n in names if n not in sys.modules]
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    sys.modules.setdefault("tensorflow.lite.python.schema_py_generated", schema)
    try:
        import litert_torch.generative.layers.lora  # noqa: F401
    finally:
        for n in added:
            sys.modules.pop(n, None)
        if sys.modules.get("tensorflow.lite.python.schema_py_generated") is schema:
            del sys.modules["tensorflow.lite.python.schema_py_generated"]
    import litert_torch.generative.layers.model_config as cfg_mod
    from litert_torch.generative.utilities import converter, loader, model_builder
    from litert_torch.generative.utilities import export_config as export_cfg

    return cfg_mod, converter, model_builder, export_cfg, loader


#: The largest |weight| a block may have before :func:`lift_zero_blocks` lifts it.
ZERO_BLOCK_FLOOR = 1e-5


def lift_zero_blocks(model, block: int) -> int:
    """Give every weight block of ``model``'s linear layers whose largest |w| is under
    :data:`ZERO_BLOCK_FLOOR` one element of that size; returns how many blocks were lifted.

    ai_edge_quantizer rounds a block-wise scale to float16: an all-zero block (a padding token's embedding row,
    shared with a tied output head, is one) gets the scale 0, and XNNPACK refuses to load an int4 tensor with
    a zero scale ("unsupported scale value (0.000000)"). The lifted block dequantizes to within 1e-5 of zero.
    """
    import torch

    lifted = 0
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, torch.nn.Linear) or w is None or w.shape[-1] % block:
                continue
            blocks = w.view(w.shape[0], -1, block)
            small = blocks.abs().amax(dim=-1) < ZERO_BLOCK_FLOOR
            if small.any():
                blocks[..., 0][small] = ZERO_BLOCK_FLOOR
                lifted += int(small.sum())
    return lifted


def _convert(hf_dir: Path, path: Path, tmp: Path, scheme: str, group_size: int, context: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # the quantizer's 0/0 on all-zero blocks and torch's deprecations
    cfg_mod, converter, model_builder, export_cfg, loader = _import_generative()
    hf = json.loads((hf_dir / "config.json").read_text())
    config = _model_config(cfg_mod, hf, context)
    tied = config.lm_head_share_weight_with_embedding
    names = model_builder.TENSOR_NAMES if tied else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD
    if hf.get("model_type") == "qwen3":
        import copy

        names = copy.copy(names)
        names.attn_query_norm = "model.layers.{}.self_attn.q_norm"
        names.attn_key_norm = "model.layers.{}.self_attn.k_norm"
    weights = sorted(hf_dir.glob("*.safetensors"))
    if len(weights) != 1:
        raise ValueError(f"expected one .safetensors file in {hf_dir}, found {len(weights)}")
    model = model_builder.DecoderOnlyModel(config, mask_cache_size=context)
    loader.ModelLoader(str(weights[0]), names).load(model, strict=not tied)
    model.eval()
    if scheme == "8da4w":
        lifted = lift_zero_blocks(model, group_size)
        print(f"edgelm: {lifted} all-zero weight blocks lifted to {ZERO_BLOCK_FLOOR:g}", file=sys.stderr)
    from litert_torch._convert import interface

    conv = interface.Converter()
    export_config = export_cfg.ExportConfig(output_logits_on_prefill=True)
    # convert_to_tflite's signatures (prefill_<N> for each length, decode), with edgelm's quantization recipe
    converter._add_signatures(conv, model, prefill_lengths(context), context, None, 0, config, [None], export_config)
    conv.convert(quant_config=_quant_config(scheme, group_size, config)).export(str(path))


def _quant_config(scheme: str, group_size: int, config):
    """litert-torch's ``full_dynamic_recipe`` for ``scheme`` (None: float32): int4 weights in blocks of
    ``group_size`` (``8da4w``; 32 or 128) or int8 weights per channel (``int8_dynamic``) in every layer, the
    embedding and the output head included, activations quantized to int8 on the fly.

    Measured on SmolLM2-135M (Q4_1 GGUF reference; README): int4 blocks 1.45x perplexity (the GGUF's weights
    rounded a second time onto symmetric blocks with bfloat16-rounded scales); int8 1.02x, 4 of 32 golden
    prompts with all 32 greedy tokens equal, 7 of 32 (1.019x) when the checkpoint had SmoothQuant's rescaling
    first (edgelm.generative does that for ``int8_dynamic``). litert-torch's weight-only int8 (1.004x, 10 of 32)
    dequantizes every weight to float32 at load: 4.4 GB resident (2.5 GB with the weight cache), so it is not
    offered; keeping only the head weight-only did not move the agreement (4 of 32) and took 1.8 GB."""
    if scheme == "fp32":
        return None
    from litert_torch.generative.quantize import quant_attrs, quant_recipes

    if scheme == "8da4w":
        block = {32: quant_attrs.Granularity.BLOCKWISE_32, 128: quant_attrs.Granularity.BLOCKWISE_128}[group_size]
        return quant_recipes.full_dynamic_recipe(config, quant_attrs.Dtype.INT4, block)
    return quant_recipes.full_dynamic_recipe(config, quant_attrs.Dtype.INT8, quant_attrs.Granularity.CHANNELWISE)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="convert a Hugging Face Llama-family checkpoint to a LiteRT decoder")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("path", type=Path)
    p.add_argument("--tmp", type=Path, required=True)
    p.add_argument("--scheme", default="8da4w")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    a = p.parse_args(argv)
    try:
        _convert(a.hf_dir, a.path, a.tmp, a.scheme, a.group_size, a.context)
    except (ValueError, KeyError) as exc:
        print(f"edgelm-error: {exc}", file=sys.stderr)
        return 2
    return 0


class LiteRTDecoder:
    """A ``.tflite`` decoder (litert-torch's prefill/decode signatures) in LiteRT on the CPU (XNNPACK);
    ``threads`` sets its thread count. :meth:`forward` returns float32 logits [n, vocab] for the n tokens fed.

    With ai-edge-litert's ``CompiledModel`` (LiteRT 2) the KV cache lives in one set of runtime tensor buffers
    passed as both the input and the output of every signature, so it is updated in place, as LiteRT-LM does,
    and XNNPACK's packed weights go to one cache file (in a temporary folder removed on :meth:`close`) that
    every signature shares; with only the classic ``Interpreter`` (``tflite_runtime`` on old boards) the cache is copied in and out
    of each call as numpy arrays (slower decode, same numbers)."""

    full_logits = True

    def __init__(self, path: Path, threads: int | None = None):
        from exporters.tflite import _interpreter_class

        path = check_artifact_file(path, ".tflite", "LiteRT")
        try:
            meta = json.loads(config_path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactLoadError(
                f"{config_path(path).name} (the decoder's settings) is missing or corrupt: {exc}"
            ) from None
        self.vocab_size = int(meta["vocab_size"])
        self.bos_id = meta.get("bos_token_id")
        self.eos_ids = [int(x) for x in meta.get("eos_token_id") or []]
        self._len = 0
        # XNNPACK packs the weights once into a cache file that every signature maps, instead of once per
        # signature in memory (SmolLM2 int8: peak RSS 872 -> 384 MB)
        self._weight_cache = Path(tempfile.mkdtemp(prefix="edgelm-xnnpack-"))
        weakref.finalize(self, shutil.rmtree, self._weight_cache, True)
        try:
            with quiet_stderr():  # LiteRT 2 logs each vendor plugin it does not find
                self._compiled = _compiled_model(path, threads or 1, self._weight_cache / "weights.xnnpack")
            if self._compiled is not None:
                sigs = self._compiled.get_signature_list()
                details = self._compiled.get_input_tensor_details("decode") if "decode" in sigs else {}
                shapes = {n: d["shape"] for n, d in details.items()}
            else:
                self._interp = _interpreter_class()(model_path=str(path), num_threads=threads or 1)
                sigs = self._interp.get_signature_list()
                self._runners = {name: self._interp.get_signature_runner(name) for name in sigs}
                details = self._runners["decode"].get_input_details() if "decode" in sigs else {}
                shapes = {n: list(d["shape"]) for n, d in details.items()}
        except (ArtifactLoadError, RuntimeNotInstalledError):
            raise
        except Exception as exc:
            raise ArtifactLoadError(f"LiteRT could not load {path}: {exc}") from exc
        if "decode" not in sigs:
            raise ArtifactLoadError(f"{path.name} is not a decoder: it has no decode signature")
        self._prefill = sorted(int(n.split("_", 1)[1]) for n in sigs if n.startswith("prefill_"))
        self._kv_names = sorted(n for n in shapes if n.startswith("kv_cache_"))
        self._kv_shapes = {n: shapes[n] for n in self._kv_names}
        self.max_context = int(shapes[self._kv_names[0]][1])
        self._kv_buffers = None
        self._io: dict[str, tuple[dict, Any]] = {}
        with quiet_stderr():  # the first buffer write sets up LiteRT's shared environment, which logs too
            if self._compiled is not None:
                self._kv_buffers = {n: self._compiled.create_input_buffer_by_name("decode", n) for n in self._kv_names}
                _silence_litert_at_exit()
            self._reset()

    def close(self) -> None:
        """Release LiteRT's model, buffers and environment (its log lines about it go to /dev/null)."""
        if getattr(self, "_compiled", None) is not None:
            with quiet_stderr():
                self._kv_buffers = None
                self._io = {}
                self._compiled = None
        if getattr(self, "_weight_cache", None) is not None:
            shutil.rmtree(self._weight_cache, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _reset(self) -> None:
        if self._kv_buffers is not None:
            for n, buf in self._kv_buffers.items():
                buf.write(np.zeros(self._kv_shapes[n], dtype=np.float32))
        else:
            self._cache = {n: np.zeros(shape, dtype=np.float32) for n, shape in self._kv_shapes.items()}

    def _run(self, signature: str, tokens: np.ndarray, pos: int) -> np.ndarray:
        n = tokens.shape[0]
        feeds = {"tokens": tokens.astype(np.int32)[None, :], "input_pos": np.arange(pos, pos + n, dtype=np.int32)}
        if self._compiled is None:
            out = self._runners[signature](**feeds, **self._cache)
            self._cache = {k: out[k] for k in self._kv_names}
            return out["logits"].reshape(n, -1)
        if signature not in self._io:  # each signature's token, position and logits buffers, made once
            m = self._compiled
            self._io[signature] = (
                {name: m.create_input_buffer_by_name(signature, name) for name in feeds},
                m.create_output_buffer_by_name(signature, "logits"),
            )
        inputs, logits = self._io[signature]
        for name, value in feeds.items():
            inputs[name].write(value)
        # the cache buffers are both input and output: updated in place
        self._compiled.run_by_name(signature, {**inputs, **self._kv_buffers}, {"logits": logits, **self._kv_buffers})
        return logits.read(n * self.vocab_size, np.float32).reshape(n, -1)

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        tokens = _check_window(self, tokens, pos)
        if pos > self._len:
            raise ValueError(f"position {pos} skips the cache, which holds {self._len} positions")
        if pos == 0:
            self._reset()
        outs, start = [], 0
        while start < len(tokens):
            rest, at = len(tokens) - start, pos + start
            fits = [n for n in self._prefill if at + n <= self.max_context]
            if rest == 1 or not fits:
                outs.append(self._run("decode", tokens[start : start + 1], at))
                start += 1
                continue
            size = next((n for n in fits if n >= rest), fits[-1])
            take = min(rest, size)
            padded = np.zeros(size, dtype=np.int64)
            padded[:take] = tokens[start : start + take]
            outs.append(self._run(f"prefill_{size}", padded, at)[:take])
            start += take
        self._len = pos + len(tokens)
        return np.concatenate(outs).astype(np.float32, copy=False)


def _compiled_model(path: Path, threads: int, weight_cache: Path):
    """ai-edge-litert's ``CompiledModel`` on the CPU with ``threads`` threads and XNNPACK's packed weights in
    the file ``weight_cache``, or None where this LiteRT has none (``tflite_runtime``, an old ai-edge-litert)."""
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.options import Options
    except ImportError:
        return None
    cpu = CpuOptions(num_threads=threads, xnnpack_weight_cache_path=str(weight_cache))
    return CompiledModel.from_file(str(path), options=Options(cpu_options=cpu))


_SILENCED: list[bool] = []


def _silence_litert_at_exit() -> None:
    """LiteRT 2 logs the teardown of its accelerator registry on fd 2 when the process ends, after Python
    has finished: send fd 2 to /dev/null at exit (once per process; Python's own error output is written
    before exit handlers run)."""
    if _SILENCED:
        return
    import atexit

    def silence() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    atexit.register(silence)
    _SILENCED.append(True)


if __name__ == "__main__":
    sys.exit(_main())
