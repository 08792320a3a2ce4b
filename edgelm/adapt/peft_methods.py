"""``edgelm adapt --method lora | prompt-tuning | scaled-prompt-tuning``: parameter-efficient fine-tuning of a
sequence classifier with ``peft``, on the full data or on N labeled examples per class (``--shots N``).

- **LoRA** (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022): peft's
  ``LoraConfig`` on the query/key/value, attention-output and both FFN Linear layers of every encoder layer
  (rank ``r``, scaling ``alpha / r``), with the new classification head trained in full (peft's
  ``modules_to_save``). The output checkpoint has the LoRA merged into the base weights
  (``merge_and_unload``); ``adapter/`` keeps the unmerged peft adapter, which ``edgelm export --lora
  separate`` exports as a shared base artifact plus a swappable weights file.
- **Prompt tuning** (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021):
  peft's ``PromptTuningConfig``: ``n`` virtual-token embeddings prepended to the word embeddings (positions
  0..n-1, the text after them), backbone frozen, head trained. peft's default random initialisation.
- **Scaled prompt tuning** (Hu, Meinel & Yang, "Scaled Prompt-Tuning for Few-Shot Natural Language
  Generation", arXiv:2309.06759, 2023): prompt tuning whose soft prompt is multiplied by a learned scaling
  before it enters the model, ``P' = P ⊙ s`` with ``s ∈ R^hidden``, so that the prompt's magnitude is learned
  apart from its direction; the paper reports better few-shot results than plain prompt tuning at about the
  same training cost. Here ``s`` starts at the ratio of the vocabulary embeddings' standard deviation to the
  prompt's (the scaled prompt starts at the scale of real token embeddings) and is trained with ``P``.

Prompt-tuned checkpoints keep the (scaled) prompt in ``prompt_embeddings.safetensors``; the export wrapper
holds it as a constant and extends the attention mask inside the graph, so the exported signature stays
``(input_ids, attention_mask)``. Heads read the masked mean of the last hidden states by default
(``pooling="mean"``, the pooling MiniLM was trained with; ``"cls"`` is Hugging Face's pooler on the first
token, and with it a prompt-tuned model equals peft's own ``PeftModelForSequenceClassification``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DataError, ModelError, RecipeError

METHODS = ("lora", "prompt-tuning", "scaled-prompt-tuning")
#: peft ``target_modules`` (a regex, matched against the full module name): the attention and FFN Linears.
LORA_TARGETS = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
#: What an adapted checkpoint records about its adaptation (next to config.json).
ADAPT_FILE = "edgelm_adapt.json"
#: The unmerged peft adapter inside an adapted checkpoint.
ADAPTER_DIR = "adapter"


@dataclass
class AdaptConfig:
    """Hyper-parameters of ``edgelm adapt``.

    Attributes:
        method: one of :data:`METHODS`.
        shots: labeled examples per class drawn from the data (seeded), or None for all of it.
        rank / alpha: LoRA rank r and scaling numerator (the update is ``alpha / r · B A``).
        num_virtual_tokens: prompt length n of (scaled) prompt tuning.
        pooling: ``"mean"``, ``"mean-l2"`` or ``"cls"`` (see module docstring).
        epochs: passes over the training examples (None: 3 on full data; few-shot: 30 for LoRA, 50 for prompts).
        lr: peak learning rate (None: 1e-3 for LoRA, 1e-2 for prompts).
        batch_size: examples per step.
        seed: seeds the shot sampling, the new head and the shuffling.
        seq_len: max tokens per example.
        max_steps: stop after this many optimizer steps (None: every epoch runs).
    """

    method: str = "lora"
    shots: int | None = None
    rank: int = 8
    alpha: float = 16.0
    num_virtual_tokens: int = 16
    pooling: str = "mean"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    seq_len: int = 128
    max_steps: int | None = None

    def resolved(self) -> AdaptConfig:
        """A copy with the method's defaults filled in. Raises RecipeError for a bad value."""
        if self.method not in METHODS:
            raise RecipeError(f"unknown adaptation method {self.method!r}: use {', '.join(METHODS)}")
        if self.shots is not None and self.shots < 1:
            raise RecipeError(f"--shots {self.shots}: use 1 or more examples per class")
        if self.rank < 1 or self.num_virtual_tokens < 1:
            raise RecipeError("--rank and --virtual-tokens must be 1 or more")
        prompt = self.method != "lora"
        few = self.shots is not None
        epochs = self.epochs if self.epochs is not None else ((50 if prompt else 30) if few else 3)
        lr = self.lr if self.lr is not None else (1e-2 if prompt else 1e-3)
        return AdaptConfig(**{**asdict(self), "epochs": epochs, "lr": lr})


@dataclass
class AdaptResult:
    """What an adaptation did: examples used, trainable parameters, wall time (s, the training only),
    accuracy on the eval data (%, or None), and the output directory."""

    method: str
    examples: int
    trainable_parameters: int
    seconds: float
    eval_accuracy: float | None
    out: Path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices (sorted) of ``shots`` examples of every class in ``labels`` (int64 [N]), drawn without
    replacement with ``seed``. Raises DataError if a class has fewer than ``shots`` examples."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise DataError(
                f"class {int(c)} has only {len(idx)} examples, fewer than --shots {shots}: "
                "lower --shots or add examples"
            )
        picked.append(rng.choice(idx, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def _prompt_source(wrapper: Any, encoder: Any, n: int, scaled: bool) -> Any:
    """A module returning the trainable prompt [n, hidden]: peft's prompt embedding, times a learned
    per-dimension scale for scaled prompt tuning."""
    import torch

    class PromptSource(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.register_buffer("indices", torch.arange(n), persistent=False)
            self.scale = None
            if scaled:
                vocab_std = wrapper.base.embeddings.word_embeddings.weight.detach().std()
                prompt_std = encoder.embedding.weight.detach().std().clamp(min=1e-12)
                hidden = encoder.embedding.weight.shape[1]
                self.scale = torch.nn.Parameter(torch.full((hidden,), float(vocab_std / prompt_std)))

        def forward(self):
            p = self.encoder(self.indices)
            return p * self.scale if self.scale is not None else p

    return PromptSource()


def attach_peft(wrapper: Any, hf: Any, cfg: AdaptConfig) -> Any:
    """Wrap ``hf`` (the classifier inside ``wrapper``) with peft for ``cfg.method``, in place: LoRA layers are
    injected into the encoder, or a prompt source is attached to ``wrapper``. Only the adapter and the head
    stay trainable. Returns the ``PeftModel``."""
    import peft

    if cfg.method == "lora":
        pc = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )
        return peft.get_peft_model(hf, pc)
    pc = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=cfg.num_virtual_tokens)
    pm = peft.get_peft_model(hf, pc)
    wrapper.prompt_source = _prompt_source(
        wrapper, pm.prompt_encoder["default"], cfg.num_virtual_tokens, scaled=cfg.method == "scaled-prompt-tuning"
    )
    return pm


def _plain_head(hf: Any) -> None:
    """Replace peft's ``ModulesToSaveWrapper`` around the head by its trained copy (prompt tuning)."""
    head = getattr(hf, "classifier", None)
    if head is not None and hasattr(head, "modules_to_save"):
        hf.classifier = head.modules_to_save["default"]


def finish(wrapper: Any, hf: Any, pm: Any, cfg: AdaptConfig, tokenizer_dir: Path, out: Path, record: dict) -> None:
    """Write the adapted checkpoint to ``out`` (atomically): the peft adapter in ``adapter/``, then the
    plain checkpoint (LoRA merged; prompt-tuned: base + trained head + ``prompt_embeddings.safetensors``)."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from edgelm.compress.train import save_checkpoint
    from edgelm.models import PROMPT_FILE

    with tempfile.TemporaryDirectory(prefix="edgelm-adapter-") as tmp:
        pm.save_pretrained(tmp)
        if cfg.method == "lora":
            merged = pm.merge_and_unload()
        else:
            with torch.no_grad():
                prompt = wrapper.prompt_embeddings().detach().clone().contiguous()
            wrapper.prompt_source = None
            merged = pm.get_base_model()
            _plain_head(merged)
            merged.config.edgelm_prompt = {"num_virtual_tokens": cfg.num_virtual_tokens, "method": cfg.method}
        merged.config.edgelm_pooling = cfg.pooling

        def extra_files(directory: Path) -> None:
            import shutil

            shutil.copytree(tmp, directory / ADAPTER_DIR)
            if cfg.method != "lora":
                save_file({"prompt_embeddings": prompt}, str(directory / PROMPT_FILE))
            (directory / ADAPT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")

        save_checkpoint(merged, tokenizer_dir, out, None, extra_files)


def run_adapt(
    model: str | os.PathLike | None,
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: AdaptConfig | None = None,
    *,
    eval_data: str | os.PathLike | None = None,
    eval_limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress: Any = None,
) -> AdaptResult:
    """Adapt ``model`` (an encoder, ``"default"`` = MiniLM, or a classifier) to the labeled ``data`` with
    ``cfg.method`` and write the adapted checkpoint to ``out`` (see module docstring).

    Raises:
        ModelError, DataError (unlabeled data, one class, too few examples for ``--shots``), RecipeError.
    """
    from edgelm.compress.train import TrainConfig, accuracy, encode_labeled, fit, load_classifier
    from edgelm.data import load_dataset, load_tokenizer
    from edgelm.models import PROMPT_KEY, load_model

    cfg = (cfg or AdaptConfig()).resolved()
    probe = load_model(model)
    if probe.config.get(PROMPT_KEY):
        raise ModelError(f"{probe.source} is already prompt-tuned: adapt its base model instead")
    seq_len = min(cfg.seq_len, probe.max_positions - (cfg.num_virtual_tokens if cfg.method != "lora" else 0))
    tokenizer = load_tokenizer(probe.tokenizer_dir, seq_len)
    full = load_dataset(data, text_column=text_column, label_column=label_column)
    train, names = encode_labeled(tokenizer, full, probe.labels)
    if cfg.shots is not None:
        idx = sample_shots(train[2], cfg.shots, cfg.seed)
        train = tuple(a[idx] for a in train)
    evals = None
    if eval_data:
        ev = load_dataset(eval_data, text_column=text_column, label_column=label_column, limit=eval_limit)
        evals = encode_labeled(tokenizer, ev, names)[0]
    import torch

    torch.manual_seed(cfg.seed)
    wrapper, hf, loaded = load_classifier(model, names, pooling=cfg.pooling, loaded=probe)
    pm = attach_peft(wrapper, hf, cfg)
    trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
    tc = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        seq_len=seq_len,
        weight_decay=0.0,
        max_steps=cfg.max_steps,
    )
    start = time.perf_counter()
    result = fit(wrapper, train, evals if cfg.shots is None else None, tc, progress=progress)
    seconds = time.perf_counter() - start
    acc = accuracy(wrapper, *evals) if evals is not None else None
    record = {
        "job": "adapt",
        "method": cfg.method,
        "base_model": _model_ref(model, loaded),
        "train": str(data),
        "examples": len(train[0]),
        "labels": names,
        "config": asdict(cfg),
        "trainable_parameters": int(trainable),
        "seconds": seconds,
        "eval": str(eval_data) if eval_data else None,
        "eval_accuracy": acc,
        "history": result.to_dict()["history"],
    }
    finish(wrapper, hf, pm, cfg, loaded.tokenizer_dir, Path(out), record)
    return AdaptResult(cfg.method, len(train[0]), int(trainable), seconds, acc, Path(out).resolve())


def _model_ref(model: Any, loaded: Any) -> str:
    """How an adapted checkpoint names its base: ``"default"`` for the packaged MiniLM, else the path."""
    return "default" if model in (None, "default") else str(loaded.source)


def load_unmerged(directory: str | os.PathLike):
    """Load a LoRA-adapted checkpoint with its adapter *unmerged*: the base model named in
    ``edgelm_adapt.json`` (or a hypernetwork's) with peft's LoRA layers and the adapter's head, as a
    :class:`~edgelm.models.LoadedModel` whose module computes ``W x + (alpha/r) B A x`` per target layer.

    Raises ModelError when ``directory`` was not adapted with LoRA (no ``adapter/`` with a LoRA config) or
    its base model is missing.
    """
    import peft

    from edgelm.compress.train import load_classifier
    from edgelm.models import POOLING_KEY, load_model

    directory = Path(directory)
    merged = load_model(directory)
    record_path = directory / ADAPT_FILE
    adapter = directory / ADAPTER_DIR
    if not record_path.is_file() or not (adapter / "adapter_config.json").is_file():
        raise ModelError(
            f"{directory} has no LoRA adapter ({ADAPT_FILE} and {ADAPTER_DIR}/): --lora separate needs "
            "a checkpoint written by `edgelm adapt --method lora` or `edgelm adapt --hypernetwork`"
        )
    record = json.loads(record_path.read_text())
    if record.get("method") not in ("lora", "hypernetwork"):
        raise ModelError(
            f"{directory} was adapted with {record.get('method')}, not LoRA: only LoRA adapters can be "
            "exported separately (a prompt-tuned model keeps its prompt in the graph)"
        )
    base = record.get("base_model")
    if base != "default" and not Path(str(base)).is_dir():
        raise ModelError(f"the base model of {directory} is missing: {base}")
    import torch

    torch.manual_seed(0)
    wrapper, hf, _ = load_classifier(base, merged.labels, pooling=merged.config.get(POOLING_KEY, "cls"))
    try:
        peft.PeftModel.from_pretrained(hf, str(adapter))  # injects the LoRA layers into hf in place
    except Exception as exc:
        raise ModelError(f"could not load the peft adapter in {adapter}: {exc}") from None
    merged.module = wrapper.eval()
    return merged
