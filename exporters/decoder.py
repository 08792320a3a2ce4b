"""Generative decoders (causal LMs with a KV cache): export to ExecuTorch and ONNX with the runtimes' own LLM
tooling, and run them one step at a time.

Export (torch side; never imports edgelm):

- :func:`export_executorch`: ExecuTorch's own LLM export (``executorch.examples.models.llama.export_llama``
  with an ``LlmConfig``): ExecuTorch's Llama-family transformer, a static KV cache of ``max_context_len``
  positions held in the program (``llama::update_cache``), ExecuTorch's custom SDPA
  (``llama::custom_sdpa``), torchao quantization (``8da4w``: int8 dynamic activations, int4 weights per
  group of ``group_size`` on every linear including the output head; 8-bit per-row embeddings), lowered to
  XNNPACK. One method ``forward(tokens int64 [1, n], input_pos int64 [1]) -> logits float32 [1, vocab]``
  (the last position's) runs a prefill of ``n`` tokens or a decode step, and the constant methods that
  ExecuTorch's LLM runner and the Android ``LlmModule`` read (``get_max_context_len``, ``get_max_seq_len``,
  ``get_bos_id``, ``get_eos_ids``, ``get_vocab_size``, ``use_kv_cache``, ``get_n_layers`` ...).
- :func:`export_onnx`: ONNX Runtime GenAI's model builder (``onnxruntime_genai.models.builder``): a decoder
  with the KV cache as inputs/outputs (``past_key_values.{i}.key/value`` -> ``present.{i}.key/value``), int4
  block-wise weights (``MatMulNBits``, block ``group_size``, ``accuracy_level=4``: activations int8 per
  block, i.e. 8da4w), a tied embedding shared with the int4 head (``GatherBlockQuantized``), and
  ``genai_config.json`` so that ``onnxruntime_genai.Model(folder)`` runs it as it is.

Run (runtime side: numpy + the runtime): :func:`load_decoder` -> a :class:`DecoderSession` whose
``forward(tokens, pos)`` feeds ``tokens`` int64 [n] at positions ``pos .. pos+n-1`` and returns float32
logits [n, vocab] (ONNX: every position) or [1, vocab] (ExecuTorch: the last position).
"""

from __future__ import annotations

import contextlib
import json
import os
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
) -> dict[str, Any]:
    """Export a Llama-family checkpoint in ExecuTorch's layout (``checkpoint``: a ``.pth`` state dict,
    ``params``: its ``params.json``; see :func:`edgelm.causal_lm.executorch_checkpoint`) to the ``.pte`` at
    ``path`` with ExecuTorch's LLM export. ``max_context_len``: KV-cache positions (tokens), also the longest
    prefill. Returns the export facts (scheme, group size, context length, seconds, methods).

    Raises:
        UnsupportedQuantError: a scheme other than :data:`DECODER_SCHEMES`.
        RuntimeNotInstalledError: executorch (or torchao) is not installed.
        ExportFailedError: ExecuTorch's export failed (the message has its last line).
    """
    _check_scheme(scheme, group_size)
    require_installed(("executorch", "executorch"), ("torchao", "torchao"), purpose="to export .pte decoders")
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import LlmConfig, ModelType

    metadata: dict[str, Any] = {}
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
    cfg.export.max_seq_length = int(max_context_len)
    cfg.export.max_context_length = int(max_context_len)
    if scheme == "8da4w":
        cfg.quantization.qmode = "8da4w"
        cfg.quantization.group_size = int(group_size)
        cfg.quantization.embedding_quantize = "8,0"  # 8 bits, one scale per row
    cfg.backend.xnnpack.enabled = True
    cfg.backend.xnnpack.extended_ops = True
    path = Path(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgelm-et-llm-") as tmp:
        cfg.export.output_dir = tmp
        cfg.export.output_name = str(Path(tmp) / "model.pte")
        try:
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
        "max_context_len": int(max_context_len),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def export_onnx(
    hf_dir: Path,
    path: Path,
    *,
    scheme: str = "8da4w",
    group_size: int = 32,
    max_context_len: int = 512,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Export the Hugging Face checkpoint in ``hf_dir`` with ONNX Runtime GenAI's model builder to the ONNX
    file ``path`` (its weights in ``<path>.data``; ``genai_config.json`` and the tokenizer files beside it).
    ``8da4w``: int4 ``MatMulNBits`` weights in blocks of ``group_size``, ``accuracy_level=4`` (int8
    activations); ``fp32``: float weights. ``max_context_len`` is written as the model's context length.

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
        "max_context_len": int(max_context_len),
        "seconds": round(time.perf_counter() - t0, 1),
    }


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
    """Send ExecuTorch's cpuinfo and thread-pool log lines (written to fd 2 and, through pybind, to
    ``sys.stderr``) to /dev/null while the block runs; Python exceptions still propagate."""
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
        self.bos_id = int(meta["get_bos_id"][0]) if "get_bos_id" in meta else None
        self.eos_ids = [int(x) for x in meta.get("get_eos_ids", [])]
        self.vocab_size = int(meta["get_vocab_size"][0]) if "get_vocab_size" in meta else 0

    def forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        torch = self._torch
        tokens = _check_window(self, tokens, pos)
        out = self._method.execute([torch.from_numpy(tokens[None, :]), torch.tensor([pos], dtype=torch.long)])[0]
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
    """Open a generative artifact (``.pte`` or ``.onnx``) for step-wise decoding.

    Raises ArtifactLoadError (missing, corrupt, not a decoder, unknown suffix) or RuntimeNotInstalledError.
    """
    path = Path(path)
    if path.suffix == ".pte":
        return ExecuTorchDecoder(path, threads)
    if path.suffix == ".onnx":
        return OnnxDecoder(path, threads)
    raise ArtifactLoadError(f"{path.name}: generative artifacts are .pte or .onnx files")


def runtime_versions(path: Path) -> dict[str, str]:
    """``{package: version}`` of the runtime that runs a decoder at ``path``."""
    names = ("executorch", "torch") if Path(path).suffix == ".pte" else ("onnxruntime", "onnxruntime-genai")
    return package_versions(*names)
