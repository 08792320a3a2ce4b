"""``edgelm adapt --model smollm2-135m --method prompt-tuning | scaled-prompt-tuning | lora``: few-shot adaptation
of a causal LM to a generation task given as source/target text pairs.

- **Prompt tuning** (Lester et al., EMNLP 2021): ``n`` trainable virtual-token embeddings P [n, H] put before
  the user's tokens (peft's ``PromptTuningConfig`` for ``CAUSAL_LM``), the model frozen.
- **Scaled prompt tuning** (Hu, Meinel & Yang 2023, "Scaled Prompt-Tuning for Few-Shot Natural Language
  Generation", arXiv:2309.06759): the soft prompt is multiplied by a learned scale before it enters the model,
  P' = P ⊙ s with s ∈ R^H, so its magnitude is learned apart from its direction; s starts at the ratio of the
  vocabulary embeddings' standard deviation to the prompt's.
- **LoRA** (Hu et al., ICLR 2022): peft's ``LoraConfig`` on every attention and MLP projection; the checkpoint
  has it merged.

The task's text layout: the model reads ``source`` then a newline and writes ``target`` then its EOS token
(:func:`example_ids`); the loss is on the target and the EOS only. A prompt-tuned checkpoint is the base model's
Hugging Face checkpoint plus ``soft_prompt.safetensors`` (``soft_prompt`` float32 [n, H], the scale applied)
and ``edgelm_adapt.json``; its soft prompt goes before the user's tokens at every generation
(:func:`generate_text`).

Evaluation: ROUGE-L F1 (Lin 2004; Google's ``rouge-score`` package, stemming on) of greedy generations against
the targets, in percent.
"""

from __future__ import annotations

import csv
import html
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DataError, ModelError, RecipeError

METHODS = ("lora", "prompt-tuning", "scaled-prompt-tuning")
#: What an adapted causal LM records (next to config.json), and the soft prompt's file.
ADAPT_FILE = "edgelm_adapt.json"
SOFT_PROMPT_FILE = "soft_prompt.safetensors"
SCHEMA = "edgelm.adapt_generation/1"
#: Between the source and the target.
SEPARATOR = "\n"
#: The zero-shot baseline's instruction for AG News headline generation (chat-templated).
HEADLINE_INSTRUCTION = "Write a short news headline for this article. Answer with the headline only.\n\n"
#: peft ``target_modules`` of LoRA on a Llama-family model.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class GenAdaptConfig:
    """Hyper-parameters of ``edgelm adapt`` on a causal LM.

    Attributes:
        method: one of :data:`METHODS`.
        shots: training pairs drawn from the data (seeded; K), or None for all of them.
        num_virtual_tokens: soft-prompt length n (prompt methods).
        rank / alpha: LoRA rank r and scaling numerator.
        epochs: passes over the pairs (None: as many as give ``min_steps`` steps, at least 3).
        min_steps: the fewest optimizer steps when ``epochs`` is None (few pairs still train).
        lr: learning rate (None: 3e-2 for prompts, 1e-3 for LoRA).
        batch_size: pairs per step.
        seed: seeds the sampling, the prompt's initialisation and the shuffling.
        max_source_tokens / max_target_tokens: longer texts are cut (the source from its end kept at the start).
    """

    method: str = "scaled-prompt-tuning"
    shots: int | None = None
    num_virtual_tokens: int = 16
    rank: int = 8
    alpha: float = 16.0
    epochs: int | None = None
    min_steps: int = 100
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    max_source_tokens: int = 128
    max_target_tokens: int = 32

    def resolved(self, n_pairs: int) -> GenAdaptConfig:
        """A copy with the defaults filled in for ``n_pairs`` training pairs. Raises RecipeError."""
        if self.method not in METHODS:
            raise RecipeError(f"unknown adaptation method {self.method!r}: use {', '.join(METHODS)}")
        if self.shots is not None and self.shots < 1:
            raise RecipeError(f"--shots {self.shots}: use 1 or more pairs")
        if self.num_virtual_tokens < 1 or self.rank < 1 or self.batch_size < 1:
            raise RecipeError("--virtual-tokens, --rank and --batch-size must be 1 or more")
        if self.epochs is not None and self.epochs < 1:
            raise RecipeError(f"--epochs {self.epochs}: use 1 or more")
        steps_per_epoch = -(-n_pairs // self.batch_size)
        epochs = self.epochs if self.epochs is not None else max(3, -(-self.min_steps // steps_per_epoch))
        lr = self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 3e-2)
        return GenAdaptConfig(**{**asdict(self), "epochs": epochs, "lr": lr})


@dataclass
class GenAdaptResult:
    """What an adaptation did: pairs used, trainable parameters, training seconds, ROUGE-L on the eval pairs
    (%, or None), and the output directory."""

    method: str
    examples: int
    trainable_parameters: int
    seconds: float
    eval_rouge_l: float | None
    out: Path
    history: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- data


def load_pairs(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """Source/target pairs from a TSV/CSV with a header naming ``source`` and ``target`` columns, a JSONL file
    with those keys, or AG News's ``Class Index,Title,Description`` CSV (source: the description, target: the
    title: headline generation). Raises DataError for a missing file, other columns, or no pair."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    pairs: list[tuple[str, str]] = []
    try:
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "source" not in row or "target" not in row:
                        raise DataError(f"{path}:{n}: each line must be an object with 'source' and 'target'")
                    pairs.append((str(row["source"]), str(row["target"])))
        else:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
            header = [h.strip().lower() for h in rows[0]] if rows else []
            if "source" in header and "target" in header:
                s, t = header.index("source"), header.index("target")
            elif "title" in header and "description" in header:  # AG News: the description -> its title
                s, t = header.index("description"), header.index("title")
            else:
                raise DataError(
                    f"{path}: the header must name 'source' and 'target' columns (or AG News's Title and "
                    f"Description); it has {rows[0] if rows else 'nothing'}"
                )
            pairs = [(r[s], r[t]) for r in rows[1:] if len(r) > max(s, t)]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not readable as pairs: {exc}") from None
    pairs = [(_clean(a), _clean(b)) for a, b in pairs if a.strip() and b.strip()]
    if not pairs:
        raise DataError(f"no source/target pairs in {path}")
    return pairs[:limit] if limit else pairs


def _clean(text: str) -> str:
    """One line: HTML entities decoded (AG News has ``&lt;``), backslash line breaks and runs of spaces
    made single spaces."""
    return " ".join(html.unescape(text).replace("\\", " ").split())


def sample_pairs(pairs: list, k: int, seed: int) -> list:
    """``k`` pairs drawn without replacement with ``seed`` (in file order). Raises DataError if too few."""
    if k > len(pairs):
        raise DataError(f"--shots {k}: the data has only {len(pairs)} pairs")
    idx = np.sort(np.random.default_rng(seed).choice(len(pairs), size=k, replace=False))
    return [pairs[i] for i in idx]


def source_ids(tokenizer: Any, source: str, max_tokens: int) -> list[int]:
    """The tokens the model reads for ``source``: the text (its first ``max_tokens`` tokens) and the
    separator."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"][:max_tokens]
    return [int(x) for x in ids] + [int(x) for x in tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]]


def example_ids(tokenizer: Any, pair: tuple[str, str], cfg: GenAdaptConfig, eos: int) -> tuple[list[int], int]:
    """(tokens, where the target starts) of one training pair: source, separator, target, EOS."""
    src = source_ids(tokenizer, pair[0], cfg.max_source_tokens)
    tgt = [int(x) for x in tokenizer(" " + pair[1], add_special_tokens=False)["input_ids"][: cfg.max_target_tokens]]
    return src + tgt + [eos], len(src)


# ---------------------------------------------------------------- the soft prompt


def build_prompt_classes():
    import torch

    class ScaledPrompt(torch.nn.Module):
        """peft's prompt embedding times a learned per-dimension scale (scaled prompt tuning); the call
        peft makes, ``(indices int64 [B, n]) -> float32 [B, n, H]``."""

        def __init__(self, embedding: torch.nn.Embedding, vocab_std: float):
            super().__init__()
            self.embedding = embedding
            prompt_std = float(embedding.weight.detach().std().clamp(min=1e-12))
            self.scale = torch.nn.Parameter(torch.full((embedding.weight.shape[1],), vocab_std / prompt_std))

        @property
        def weight(self):  # peft reads the prompt embedding's device from it
            return self.embedding.weight

        def forward(self, indices):
            return self.embedding(indices) * self.scale

    return ScaledPrompt


def attach(model: Any, cfg: GenAdaptConfig) -> Any:
    """``model`` (a transformers causal LM) wrapped by peft for ``cfg.method``; only the adapter trains.
    Prompt methods start the soft prompt from the embeddings of random vocabulary tokens (Lester et al.'s
    sampled-vocabulary initialisation)."""
    import peft
    import torch

    if cfg.method == "lora":
        pc = peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )  # fmt: skip
        return peft.get_peft_model(model, pc)
    pm = peft.get_peft_model(
        model, peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    )
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(cfg.seed)
    rows = torch.randint(0, emb.shape[0], (cfg.num_virtual_tokens,), generator=g)
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(emb[rows].detach())
    if cfg.method == "scaled-prompt-tuning":  # peft's PromptEmbedding calls self.embedding(indices)
        encoder.embedding = build_prompt_classes()(encoder.embedding, float(emb.detach().std()))
    return pm


def soft_prompt(pm: Any, n: int) -> Any:
    """The trained soft prompt of ``n`` virtual tokens as the model sees it: float32 [n, H] (scale applied)."""
    import torch

    with torch.no_grad():
        return pm.prompt_encoder["default"](torch.arange(n)[None])[0].detach().float().contiguous()


# ---------------------------------------------------------------- training, generation, scoring


def train(pm: Any, tokenizer: Any, pairs: list, cfg: GenAdaptConfig, eos: int, progress=None) -> list[float]:
    """Fit the adapter on ``pairs``: cross-entropy of the target and EOS tokens. Returns the loss per step."""
    import torch

    from edgelm.compress.train import optimizer_step

    examples = [example_ids(tokenizer, p, cfg, eos) for p in pairs]
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    history: list[float] = []
    pm.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(len(examples))
        for b in range(0, len(order), cfg.batch_size):
            batch = [examples[i] for i in order[b : b + cfg.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, (x, start) in enumerate(batch):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
                labels[r, start : len(x)] = torch.tensor(x[start:])
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            history.append(optimizer_step(loss, opt, params, sched))
            if progress:
                progress("training", len(history), steps)
    pm.eval()
    return history


def generate_text(
    model: Any, tokenizer: Any, source_tokens: list[int], max_new: int, eos: int | list[int], prompt: Any = None
) -> list[int]:
    """Greedy decoding after ``source_tokens`` with transformers' cache, stopping at ``eos`` (an id or several);
    ``prompt`` (float32 [n, H]) goes before them as embeddings (a prompt-tuned model). Returns the new tokens
    without the EOS."""
    import torch

    stop = {eos} if isinstance(eos, int) else set(eos)
    with torch.inference_mode():
        emb = model.get_input_embeddings()(torch.tensor([source_tokens]))
        if prompt is not None:
            emb = torch.cat([prompt[None].to(emb.dtype), emb], dim=1)
        out = model(inputs_embeds=emb, use_cache=True)
        new: list[int] = []
        for _ in range(max_new):
            t = int(torch.argmax(out.logits[0, -1]))
            if t in stop:
                break
            new.append(t)
            out = model(input_ids=torch.tensor([[t]]), cache=out.cache, use_cache=True)
        return new


def generate_batch(
    model: Any,
    sources: list[list[int]],
    max_new: int,
    eos: int | list[int],
    prompt: Any = None,
    batch_size: int = 32,
    progress=None,
) -> list[list[int]]:
    """Greedy decoding after each of ``sources`` (token ids), ``batch_size`` sequences at a time with
    transformers' ``generate`` (left padding, attention mask); ``prompt`` (float32 [n, H]) goes before every
    source as embeddings. Returns each source's new tokens without the EOS: what :func:`generate_text` gives
    one at a time (a batch runs about 6x faster per item on a 2-core CPU; padding can flip a near-tie argmax,
    rarely). ``progress(desc, done, total)`` after each batch."""
    import torch

    stop = [eos] if isinstance(eos, int) else list(eos)
    pad = stop[0]
    embed = model.get_input_embeddings()
    out: list[list[int]] = []
    with torch.inference_mode():
        for b in range(0, len(sources), batch_size):
            chunk = sources[b : b + batch_size]
            width = max(len(s) for s in chunk)
            n = 0 if prompt is None else int(prompt.shape[0])
            ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in chunk])
            mask = torch.tensor([[0] * (width - len(s)) + [1] * (n + len(s)) for s in chunk])
            emb = embed(ids)
            if prompt is not None:  # [pads, prompt, source]: the prompt right before each source
                p = prompt.to(emb.dtype)
                emb = torch.stack(
                    [torch.cat([e[: width - len(s)], p, e[width - len(s) :]]) for e, s in zip(emb, chunk, strict=True)]
                )
            gen = model.generate(
                inputs_embeds=emb,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=pad,
            )
            for row in gen.tolist():
                new: list[int] = []
                for t in row:
                    if t in stop:
                        break
                    new.append(int(t))
                out.append(new)
            if progress:
                progress("generating", len(out), len(sources))
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 in percent (``rouge-score``, Porter stemming). Raises ModelError without the package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ModelError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def evaluate(
    model: Any, tokenizer: Any, pairs: list, cfg: GenAdaptConfig, eos: int, prompt: Any = None, progress=None
) -> tuple[float, list[str]]:
    """ROUGE-L (%) of greedy generations on ``pairs`` and the generations."""
    sources = [source_ids(tokenizer, src, cfg.max_source_tokens) for src, _ in pairs]
    say = (lambda _d, done, total: progress("generating the eval targets", done, total)) if progress else None
    news = generate_batch(model, sources, cfg.max_target_tokens, eos, prompt, progress=say)
    preds = [tokenizer.decode(new, skip_special_tokens=True).strip() for new in news]
    return rouge_l(preds, [t for _, t in pairs]), preds


def run_adapt_generation(
    model: str,
    data: str | os.PathLike | list[tuple[str, str]],
    out: str | os.PathLike,
    cfg: GenAdaptConfig | None = None,
    *,
    eval_data: str | os.PathLike | None = None,
    eval_limit: int | None = None,
    progress=None,
) -> GenAdaptResult:
    """Adapt the causal LM ``model`` (``smollm2-135m``, a GGUF or a checkpoint directory) to the pairs in
    ``data`` with ``cfg.method`` and write the adapted checkpoint to ``out`` (atomically; see the module
    docstring). ``data``: a pairs file (:func:`load_pairs`) or the pairs themselves. ``eval_data``: pairs scored
    by ROUGE-L after training (when it is the training file, the pairs trained on are left out of the score).

    Raises:
        ModelError (not a causal LM, unreadable), DataError (no pairs, too few for ``--shots``), RecipeError.
    """
    import torch
    from safetensors.torch import save_file

    from edgelm import fsutil
    from edgelm.causal_lm import load_causal_lm, save_hf_checkpoint
    from edgelm.compress.hybrid_qrnn import read_hybrid_config

    if read_hybrid_config(model) is not None:
        raise RecipeError(f"{model} is a hybrid QRNN checkpoint: adapt the model it was made from, then compress")
    earlier = read_adapt_record(model)
    if earlier and earlier.get("method") != "lora":
        raise RecipeError(f"{model} is already prompt-tuned ({earlier.get('method')}): adapt its base model instead")
    cfg = cfg or GenAdaptConfig()
    given = isinstance(data, list)
    pairs = list(data) if given else load_pairs(data)
    if not pairs:
        raise DataError("no source/target pairs to train on")
    train_pairs = sample_pairs(pairs, cfg.shots, cfg.seed) if cfg.shots else pairs
    cfg = cfg.resolved(len(train_pairs))
    evals = None
    if eval_data:
        evals = load_pairs(eval_data)
        if not given and Path(eval_data).resolve() == Path(data).resolve():
            seen = set(train_pairs)
            evals = [p for p in evals if p not in seen]
        evals = evals[:eval_limit] if eval_limit else evals
    done: list[GenAdaptResult] = []

    def fill(tmp: Path) -> None:  # everything inside: third-party output goes to the checkpoint's logs/adapt.log
        (tmp / "logs").mkdir()
        with fsutil.captured_output(tmp / "logs" / "adapt.log"):
            _fill(tmp)

    def _fill(tmp: Path) -> None:
        if progress:
            progress("loading the model", 0, 1)
        lm = load_causal_lm(model)
        eos = lm.eos_ids[0] if lm.eos_ids else int(lm.tokenizer.eos_token_id)
        torch.manual_seed(cfg.seed)
        for p in lm.model.parameters():
            p.requires_grad_(False)
        pm = attach(lm.model, cfg)
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        start = time.perf_counter()
        history = train(pm, lm.tokenizer, train_pairs, cfg, eos, progress)
        seconds = time.perf_counter() - start
        prompt = None
        if cfg.method == "lora":
            merged = pm.merge_and_unload()
        else:
            prompt = soft_prompt(pm, cfg.num_virtual_tokens)
            merged = pm.get_base_model()
        score = None
        if evals:
            score, _ = evaluate(merged, lm.tokenizer, evals, cfg, eos, prompt, progress)
        record = {
            "schema": SCHEMA,
            "job": "adapt",
            "task": "text-generation",
            "method": cfg.method,
            "base_model": str(model),
            "train": f"{len(pairs)} pairs given" if given else str(data),
            "examples": len(train_pairs),
            "config": asdict(cfg),
            "separator": SEPARATOR,
            "trainable_parameters": int(trainable),
            "seconds": seconds,
            "eval": str(eval_data) if eval_data else None,
            "eval_pairs": len(evals or []),
            "eval_rouge_l": score,
            "history": history,
        }
        lm.model = merged
        save_hf_checkpoint(lm, tmp)
        if prompt is not None:
            save_file({"soft_prompt": prompt}, str(tmp / SOFT_PROMPT_FILE))
        (tmp / ADAPT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        done.append(
            GenAdaptResult(cfg.method, len(train_pairs), int(trainable), seconds, score, Path(out).resolve(), history)
        )

    fsutil.write_directory(Path(out), fill)
    return done[0]


def load_soft_prompt(directory: str | os.PathLike, hidden: int) -> Any:
    """The soft prompt of a prompt-tuned checkpoint: float32 [n, ``hidden``]. Raises ModelError when the file
    is missing, corrupt or of another width."""
    from safetensors.torch import load_file

    path = Path(directory) / SOFT_PROMPT_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: the soft prompt of this prompt-tuned checkpoint; adapt it again")
    try:
        prompt = load_file(str(path))["soft_prompt"].float()
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ModelError(f"{path} is corrupt ({exc})") from None
    if prompt.ndim != 2 or prompt.shape[1] != hidden or prompt.shape[0] < 1:
        raise ModelError(f"{path} holds a prompt of shape {tuple(prompt.shape)}; the model needs [n, {hidden}]")
    return prompt


def prefix_cache(model: Any, prompt: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The soft prompt's keys and values per layer as transformers' cache holds them after running ``prompt``
    (float32 [n, H]) at positions 0..n-1: float32 [kv_heads, n, head_dim] each (after RoPE)."""
    import torch

    with torch.no_grad():
        cache = model(inputs_embeds=prompt[None].float(), use_cache=True).cache
    keys = [layer.keys[0].float().numpy().copy() for layer in cache.layers]
    values = [layer.values[0].float().numpy().copy() for layer in cache.layers]
    return keys, values


def prefixed_model(model: Any, prompt: Any) -> Any:
    """``model`` with the soft prompt always before the tokens it is given: a module with the causal LM's call
    (``input_ids``, ``cache``, ``use_cache``) whose logits are those of the given tokens only.
    A call without a cache starts a sequence from the prompt's cache (computed once, copied per sequence).
    The reference of a prompt-tuned model's export."""
    import copy

    import torch

    class Prefixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = model.config
            with torch.no_grad():
                self._cache = model(inputs_embeds=prompt[None].float(), use_cache=True).cache

        def forward(self, input_ids=None, cache=None, use_cache=False, **kwargs):
            past = cache if cache is not None else kwargs.pop("past_key_values", None)
            if past is None:
                past = copy.deepcopy(self._cache)
            return self.inner(input_ids=input_ids, cache=past, use_cache=True, **kwargs)

    return Prefixed().eval()


def read_adapt_record(directory: str | os.PathLike) -> dict | None:
    """``edgelm_adapt.json`` of an adapted causal LM, or None when the folder has none or is not one."""
    from edgelm.fsutil import read_json_sidecar

    doc = read_json_sidecar(Path(directory) / ADAPT_FILE, "adapt the model again")
    return doc if doc is not None and doc.get("schema") == SCHEMA else None
