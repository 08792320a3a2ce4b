"""TFLite / LiteRT export (litert-torch) and LiteRT interpreter sessions.

Shapes: litert-torch cannot convert BERT with a dynamic sequence axis, so one ``.tflite`` holds one
signature per sequence bucket (``seq_16``, ``seq_32``, ``seq_64``, ``seq_128`` up to the example's
length), sharing their weights; the session pads each input up to the next bucket (padding is masked,
so outputs do not change). Inputs are int32: the TFLite interpreter rejects int64.

Quantization (``int8_dynamic``): litert-torch's ``full_dynamic_recipe`` (int8 weights per channel,
dynamic-range int8 activations). It quantizes every weight tensor, the embedding tables included, so
this scheme requires ``embedding_bits=8``. LayerNorm, Softmax and GELU run in float. litert-torch's PT2E
dynamic quantizer fails at run time here (embedding zero point) and is not used. MiniLM: 23.6 MB,
cosine 0.997.

``8da4w``: ``full_dynamic_recipe`` with int4 weights in blocks of ``group_size`` (dynamic-range int8
activations). ``fp16``: ``full_fp16_recipe`` (float16 weights for the GPU delegate; the CPU dequantizes).
``int8_static`` and ``int4_weight_only`` are refused with the reason (:data:`UNSUPPORTED`).

The default XNNPACK delegate is kept on (without it MiniLM took 98 ms instead of ~5 ms).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters import register
from exporters.base import (
    Artifact,
    ArtifactLoadError,
    ExportFailedError,
    ExportOptions,
    ModuleFormat,
    QuantSpec,
    UnsupportedQuantError,
    check_artifact_file,
    ensure_scheme,
    input_specs,
    is_installed,
    output_specs,
    package_versions,
    require,
    require_installed,
    split_rows,
    trim_padding,
)

FORMAT = "tflite"
SUFFIX = ".tflite"
SCHEMES = ("fp32", "fp16", "int8_dynamic", "8da4w")
#: Why the other schemes are refused (the message of the UnsupportedQuantError).
UNSUPPORTED = {
    "int8_static": "litert-torch and ai-edge-quantizer quantize every op's activations statically (w8a8), "
    "which collapsed MiniLM to cosine 0.64, and cannot keep the sensitive layers float here; "
    "use int8_dynamic for TFLite, or int8_static with ONNX or ExecuTorch",
    "int4_weight_only": "litert-torch's recipe matrix has no int4 weight-only layer recipe; use 8da4w (int4 "
    "blockwise weights, dynamic-range int8 activations)",
}
#: Why TFLite has no separate adapter weights (the message of the error).
NO_SEPARATE_ADAPTERS = (
    "TFLite cannot keep adapter weights outside the model: a .tflite stores every constant in its flatbuffer and "
    "the LiteRT interpreter has no external-weights API; export the LoRA merged (the default, one .tflite per "
    "adapter), or use ONNX or ExecuTorch for one base with swappable adapters"
)
DELEGATE = "XNNPACK"
#: Profile delegate names this exporter's artifacts are validated with.
DELEGATES = ("xnnpack",)


def check_installed() -> None:
    """Raise RuntimeNotInstalledError unless litert-torch and a LiteRT interpreter are installed."""
    require_installed(("litert_torch", "litert-torch"), purpose="for TFLite conversion")
    if not is_installed("tflite_runtime"):
        require_installed(("ai_edge_litert", "ai-edge-litert"), purpose="to run .tflite artifacts")


def runtime_versions() -> dict[str, str]:
    return package_versions("torch", "litert-torch", "ai-edge-litert")


#: The input signatures a TFLite export takes: token ids (a whole model, an early-exit cascade's first
#: segment) or float32 hidden states [1, seq, hidden] (a later segment), each with the attention mask.
SIGNATURES = (("input_ids", "attention_mask"), ("hidden_states", "attention_mask"))


def default_buckets(max_seq: int) -> list[int]:
    """Sequence buckets: powers of two from 16 below ``max_seq``, then ``max_seq`` itself."""
    buckets = [b for b in (16, 32, 64, 128, 256, 512) if b < max_seq]
    return [*buckets, max_seq]


def _recipe(quant: QuantSpec) -> tuple[Any, str]:
    """The litert-torch quantization config for ``quant`` and a one-line description of it."""
    recipes = require("litert_torch.generative.quantize.quant_recipes", "litert-torch", "for quantization recipes")
    attrs = require("litert_torch.generative.quantize.quant_attrs", "litert-torch", "for quantization recipes")
    if quant.scheme == "fp16":
        return recipes.full_fp16_recipe(), "litert_torch full_fp16_recipe (float16 weights, float32 compute)"
    if quant.scheme == "int8_dynamic":
        return (
            recipes.full_dynamic_recipe(),
            "litert_torch full_dynamic_recipe (int8 channelwise weights, dynamic-range int8 activations)",
        )
    block = getattr(attrs.Granularity, f"BLOCKWISE_{quant.group_size}")
    return (
        recipes.full_dynamic_recipe(weight_dtype=attrs.Dtype.INT4, granularity=block),
        f"litert_torch full_dynamic_recipe (int4 weights, blocks of {quant.group_size}; dynamic-range int8 activations)",
    )


def export(
    module: Any,
    example_inputs: dict[str, Any],
    quant: QuantSpec,
    path: Path,
    options: ExportOptions | None = None,
) -> Artifact:
    """Convert ``module`` (forward(input_ids, attention_mask) -> float32 [1, ...]) to a ``.tflite`` file.

    Args:
        example_inputs: ``{"input_ids", "attention_mask"}`` tensors [1, max_seq].
        quant: one of :data:`SCHEMES` (quantized ones need embedding_bits=8, see module docstring).
        options: :class:`~exporters.base.ExportOptions`: the output name, ``seq_buckets`` (sequence lengths
            to export one signature each for; default :func:`default_buckets`); ``adapter_modules`` must be
            empty (:data:`NO_SEPARATE_ADAPTERS`); ``calibration`` is not used (no static scheme).
    Raises:
        UnsupportedQuantError, RuntimeNotInstalledError, ExportFailedError.
    """
    options = options or ExportOptions()
    seq_buckets, adapter_modules = options.seq_buckets, options.adapter_modules
    ensure_scheme(quant, SCHEMES, "TFLite", UNSUPPORTED)
    if adapter_modules:
        raise UnsupportedQuantError(NO_SEPARATE_ADAPTERS)
    if quant.scheme in ("int8_dynamic", "8da4w") and quant.embedding_bits != 8:
        raise UnsupportedQuantError(
            f"TFLite {quant.scheme} (a litert-torch recipe) always quantizes the embedding tables too; "
            "use embedding_bits=8, or fp32/fp16"
        )
    if quant.scheme == "int8_dynamic" and not quant.per_channel:
        raise UnsupportedQuantError("TFLite int8_dynamic is per-channel only in edgelm")
    import torch

    litert_torch = require("litert_torch", "litert-torch", "to convert models to .tflite")
    path = Path(path)
    start = time.perf_counter()
    max_seq = int(example_inputs["attention_mask"].shape[1])
    buckets = sorted(set(seq_buckets or default_buckets(max_seq)))

    names = options.names
    keys = tuple(example_inputs)
    if keys not in SIGNATURES:
        raise ExportFailedError(f"TFLite export takes inputs {' or '.join(str(k) for k in SIGNATURES)}, not {keys}")
    inputs = input_specs(example_inputs, "int32", (1, "seq_bucket"))
    outputs = output_specs(module, example_inputs, options, (1,))

    def named(out: Any) -> dict[str, torch.Tensor]:
        return dict(zip(names, out if isinstance(out, tuple | list) else (out,), strict=True))

    class TokenInputs(torch.nn.Module):  # int32 ids and mask, as the TFLite interpreter takes them
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return named(self.inner(input_ids.to(torch.int64), attention_mask.to(torch.int64)))

    class HiddenInputs(torch.nn.Module):  # an early-exit segment: float32 hidden states and the int32 mask
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
            return named(self.inner(hidden_states, attention_mask.to(torch.int64)))

    wrapped = (TokenInputs if keys[0] == "input_ids" else HiddenInputs)(module).eval()
    converter = None
    for b in buckets:
        kwargs = {
            k: torch.zeros(1, b, *v.shape[2:], dtype=torch.float32)
            if v.is_floating_point()
            else torch.ones(1, b, dtype=torch.int32)
            for k, v in example_inputs.items()
        }
        converter = (litert_torch.signature if converter is None else converter.signature)(
            f"seq_{b}", wrapped, sample_kwargs=kwargs
        )
    quant_config = None
    details: dict[str, Any] = {
        "delegate": DELEGATE,
        "seq_buckets": buckets,
        "signatures": [f"seq_{b}" for b in buckets],
    }
    if quant.is_quantized:
        quant_config, details["recipe"] = _recipe(quant)
        details["float_ops"] = ["layer_norm", "softmax", "gelu", "add (residual)"]
    try:
        with torch.no_grad():
            model = converter.convert(quant_config=quant_config)
            model.export(str(path))
    except Exception as exc:
        raise ExportFailedError(f"litert-torch conversion failed: {type(exc).__name__}: {exc}") from exc
    return Artifact(
        path=path,
        format=FORMAT,
        quant=quant,
        inputs=inputs,
        outputs=outputs,
        runtime=runtime_versions(),
        details=details,
        export_seconds=time.perf_counter() - start,
    )


def _interpreter_class():
    """LiteRT's interpreter; ``tflite_runtime`` only where ai-edge-litert is not installed (old boards)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            require("ai_edge_litert.interpreter", "ai-edge-litert", "to run .tflite artifacts")  # raises
            raise
    return Interpreter


class TFLiteSession:
    """A ``.tflite`` artifact in the LiteRT interpreter with the XNNPACK delegate.

    ``run(feeds)``: int arrays [batch, seq] -> ``{name: float32 [batch, ...]}``. Each row is trimmed of
    trailing padding, padded up to the smallest signature bucket that holds it, cast to int32 and run.
    Raises ValueError if a row is longer than the largest bucket.
    """

    def __init__(self, path: Path, threads: int | None = None):
        path = check_artifact_file(path, SUFFIX, "TFLite")
        Interpreter = _interpreter_class()
        try:
            self._interp = Interpreter(model_path=str(path), num_threads=int(threads) if threads else None)
            signatures = self._interp.get_signature_list()
        except Exception as exc:
            raise ArtifactLoadError(f"LiteRT could not load {path}: {exc}") from exc
        self._runners: dict[int, Any] = {}
        for name in signatures:
            if name.startswith("seq_") and name[4:].isdigit():
                self._runners[int(name[4:])] = self._interp.get_signature_runner(name)
        if not self._runners:
            raise ArtifactLoadError(f"{path} has no seq_N signatures: it was not exported by edgelm")
        first = signatures[f"seq_{min(self._runners)}"]
        self.input_names = list(first["inputs"])
        self.output_names = list(first["outputs"])
        details = self._runners[min(self._runners)].get_input_details()
        self._dtypes = {k: np.dtype(details[k]["dtype"]) for k in self.input_names}
        self.buckets = sorted(self._runners)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs: list[dict[str, np.ndarray]] = []
        for row in split_rows(feeds):
            row = trim_padding(row)
            length = row["attention_mask"].shape[1]
            bucket = next((b for b in self.buckets if b >= length), None)
            if bucket is None:
                raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {self.buckets[-1]}")
            padded = {}
            for k in self.input_names:
                arr = np.zeros((1, bucket, *row[k].shape[2:]), dtype=self._dtypes[k])
                arr[:, :length] = row[k]
                padded[k] = arr
            result = self._runners[bucket](**padded)
            # outputs along the sequence (an early-exit segment's hidden states) lose the bucket's padding
            outs.append({k: v[:, :length] if v.ndim == 3 else v for k, v in result.items()})
        return {k: np.concatenate([o[k] for o in outs], axis=0).astype(np.float32) for k in self.output_names}


def load(path: Path, threads: int | None = None, adapter: Path | None = None) -> TFLiteSession:
    """Open a ``.tflite`` artifact. Raises ArtifactLoadError (also for ``adapter``: see
    :data:`NO_SEPARATE_ADAPTERS`) or RuntimeNotInstalledError."""
    if adapter is not None:
        raise ArtifactLoadError(NO_SEPARATE_ADAPTERS)
    return TFLiteSession(path, threads)


@register
class TFLiteFormat(ModuleFormat):
    """TFLite / LiteRT (``.tflite``) through litert-torch; runs in the LiteRT interpreter with XNNPACK."""

    name = FORMAT
    suffix = SUFFIX
    schemes = SCHEMES
    unsupported = UNSUPPORTED
    delegates = DELEGATES
    profile_runtimes = "tflite_delegates"
    runtime_overhead_mb = 6.0
    app_runtime = "litert"
    separate_adapters = NO_SEPARATE_ADAPTERS
