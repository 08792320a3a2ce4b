"""Fine-tuning, pruning during fine-tuning, and knowledge distillation of sequence classifiers.

One training loop (:func:`fit`) serves three jobs:

- **fine-tuning** (``edgelm finetune``): cross-entropy, AdamW or SAGE (:mod:`edgelm.compress.sage`),
  evaluation after every epoch, the best epoch's weights kept;
- **structured pruning during fine-tuning** (``edgelm compress --method platon``): PLATON importance and a
  cubic sparsity schedule (:mod:`edgelm.compress.pruning`), structures removed for real at the end;
- **distillation** (``--distill``): teacher = the fine-tuned model, student = the pruned one, with the loss
  of :func:`distillation_loss` (CE + temperature KL on logits + hidden-state MSE on mapped layers, after
  the layer-wise, task-aware distillation of Liang et al., "Less is More: Task-aware Layer-wise
  Distillation for Language Model Compression", ICML 2023). With PLATON pruning *and* ``--distill`` the
  student starts as a copy of the teacher and is pruned iteratively while it is distilled, with importance
  measured on the distillation loss: HomoDistil (Liang et al., "HomoDistil: Homotopic Task-Agnostic
  Distillation of Pre-trained Transformers", ICLR 2023), here applied to the task.

Every function takes the edgelm wrapper (``forward(input_ids, attention_mask) -> logits``), so what is
trained is exactly the graph that is exported.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.compress import pruning
from edgelm.errors import DataError, ModelError
from edgelm.fsutil import write_directory

Progress = Callable[[str, int, int], None]  # (description, completed, total)


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step.
        lr: peak learning rate (linear warm-up over 6% of steps, then linear decay).
        optimizer: ``"adamw"`` or ``"sage"``.
        seed: seeds torch and the shuffling: a fixed seed gives the same weights on the same machine.
        seq_len: max tokens per example (longer ones are truncated).
        weight_decay: decoupled weight decay (not on biases and LayerNorm).
        max_steps: stop after this many optimizer steps, inside an epoch if need be (None: every epoch runs);
            the learning-rate schedule spans the steps that run.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    optimizer: str = "adamw"
    seed: int = 0
    seq_len: int = 128
    weight_decay: float = 0.01
    max_steps: int | None = None


@dataclass
class PruneConfig:
    """Structured pruning during fine-tuning (PLATON, cubic schedule).

    Attributes:
        sparsity: final share of FFN neurons removed, in [0, 1).
        head_sparsity: final share of attention heads removed (default: ``sparsity``).
        warmup_frac / final_frac: share of steps before pruning starts / at the final sparsity.
        every: re-select the masks every this many steps.
    """

    sparsity: float = 0.5
    head_sparsity: float | None = None
    warmup_frac: float = 0.1
    final_frac: float = 0.25
    every: int = 10


@dataclass
class DistillConfig:
    """Distillation loss weights: ``alpha_ce · CE + alpha_kl · T² · KL + alpha_hidden · mean-layer MSE``.

    Attributes:
        temperature: softmax temperature T of the logit KL term.
        alpha_ce / alpha_kl / alpha_hidden: weights of the three terms.
    """

    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_kl: float = 0.5
    alpha_hidden: float = 1.0


@dataclass
class EpochResult:
    """One epoch: mean training loss, eval accuracy (%, or None without eval data), sparsity reached."""

    epoch: int
    train_loss: float
    eval_accuracy: float | None
    head_sparsity: float = 0.0
    neuron_sparsity: float = 0.0


@dataclass
class FitResult:
    """What :func:`fit` did: per-epoch results, the epoch kept, its accuracy (%), wall time (s), and the
    pruning record when structures were removed."""

    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_accuracy: float | None = None
    seconds: float = 0.0
    pruning: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Map student hidden states to teacher ones (both counted with the embedding output at 0): student
    layer ``i`` of ``n_student`` learns from teacher layer ``round(i · n_teacher / n_student)``."""
    return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]


def distillation_loss(
    student_logits, teacher_logits, labels, student_hidden: list, teacher_hidden: list, mask, cfg: DistillConfig
):
    """Knowledge distillation loss (scalar tensor).

    Args:
        student_logits / teacher_logits: float32 [batch, num_labels].
        labels: int64 [batch].
        student_hidden / teacher_hidden: L_s + 1 and L_t + 1 tensors float32 [batch, seq, hidden] (embedding
            output first), mapped by :func:`layer_map`; an empty list skips the hidden term.
        mask: attention mask int [batch, seq]; padded positions do not count in the MSE.
    """
    import torch.nn.functional as F

    T = cfg.temperature
    loss = cfg.alpha_ce * F.cross_entropy(student_logits, labels)
    kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.softmax(teacher_logits / T, -1), reduction="batchmean")
    loss = loss + cfg.alpha_kl * T * T * kl
    if cfg.alpha_hidden and student_hidden and teacher_hidden:
        m = mask.to(student_logits.dtype)[:, :, None]
        pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
        mse = sum(
            (((student_hidden[s] - teacher_hidden[t]) ** 2) * m).sum() / (m.sum() * student_hidden[s].shape[-1])
            for s, t in pairs
        ) / len(pairs)
        loss = loss + cfg.alpha_hidden * mse
    return loss


def optimizer_step(loss: Any, optimizer: Any, params: Any, schedule: Any = None) -> float:
    """One optimizer step on scalar ``loss``: gradients cleared, back-propagated, their global norm clipped at
    1.0 over ``params``, the step and the learning-rate ``schedule``'s (when given). Returns the loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return loss.item()


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _trim(ids: np.ndarray, mask: np.ndarray):
    """Drop the columns that are padding in every row of a batch (right padding): same outputs, less work."""
    import torch

    from exporters.base import trim_padding

    batch = trim_padding({"input_ids": ids, "attention_mask": mask})
    return torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])


def predict(wrapper: Any, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits float32 [N, num_labels] of ``wrapper`` in eval mode (no grad), batched and padding-trimmed."""
    import torch

    was_training = wrapper.training
    wrapper.eval()
    outs = []
    with torch.no_grad():
        for idx in _batches(len(ids), batch_size, None):
            outs.append(wrapper(*_trim(ids[idx], mask[idx])).float().numpy())
    wrapper.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def accuracy(wrapper: Any, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> float:
    """Task accuracy of ``wrapper`` in %, on int64 [N, seq] ids/mask and int64 [N] labels."""
    from edgelm.validate.metrics import accuracy as logits_accuracy

    return logits_accuracy(predict(wrapper, ids, mask), labels)


def checkpoint_accuracy(
    model: str | Path,
    data: str,
    limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    seq_len: int = 128,
) -> float:
    """Accuracy (%) of a classifier checkpoint (PyTorch fp32) on the labeled file ``data``, tokenized at up
    to ``seq_len`` tokens. Raises ModelError / DataError for a bad checkpoint or file."""
    from edgelm.data import load_dataset, load_tokenizer
    from edgelm.models import load_model

    loaded = load_model(model)
    tok = load_tokenizer(loaded.tokenizer_dir, min(seq_len, loaded.max_positions))
    (ids, mask, labels), _ = encode_labeled(tok, load_dataset(data, text_column, label_column, limit), loaded.labels)
    return accuracy(loaded.module, ids, mask, labels)


def fit(
    wrapper: Any,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    eval_set: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    cfg: TrainConfig,
    *,
    prune: PruneConfig | None = None,
    teacher: Any = None,
    distill: DistillConfig | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Train ``wrapper`` (in place) on ``train = (ids int64 [N, seq], mask int64 [N, seq], labels int64 [N])``.

    After each epoch the model is evaluated on ``eval_set`` and the best epoch's weights are restored at the
    end (with pruning: the best epoch among those at the final sparsity). With ``prune``, PLATON masks follow
    the cubic schedule and the pruned structures are removed at the end. With ``teacher`` (eval mode, not
    trained), the loss is :func:`distillation_loss` (``distill`` or its defaults).

    Raises:
        DataError: an empty training set.
    """
    import torch
    import torch.nn.functional as F

    from edgelm.compress.sage import linear_schedule, make_optimizer

    ids, mask, labels = train
    if len(ids) == 0:
        raise DataError("the training set is empty")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = (len(ids) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = make_optimizer(cfg.optimizer, wrapper, cfg.lr, cfg.weight_decay)
    schedule = linear_schedule(optimizer, total)
    scorer = pruning.PlatonScorer(wrapper) if prune else None
    masks = pruning.Masks.full(wrapper) if prune else None
    distill = distill or DistillConfig()
    head_final = 0.0
    if prune is not None:
        head_final = prune.sparsity if prune.head_sparsity is None else prune.head_sparsity
    best_masks = masks
    hsize = pruning.head_size(wrapper)
    if teacher is not None:
        teacher.eval()
    result = FitResult()
    best_state, best_acc = None, -1.0
    start = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        if step >= total:
            break
        wrapper.train()
        losses = []
        for idx in _batches(len(ids), cfg.batch_size, rng):
            if step >= total:
                break
            x, m = _trim(ids[idx], mask[idx])
            y = torch.from_numpy(labels[idx])
            if teacher is not None:
                s_hidden: list = [] if distill.alpha_hidden else None
                logits, _ = wrapper.forward_hidden(x, m, s_hidden)
                with torch.no_grad():
                    t_hidden: list = [] if distill.alpha_hidden else None
                    t_logits, _ = teacher.forward_hidden(x, m, t_hidden)
                loss = distillation_loss(logits, t_logits, y, s_hidden or [], t_hidden or [], m, distill)
            else:
                loss = F.cross_entropy(wrapper(x, m), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wrapper.parameters(), 1.0)
            if scorer is not None:
                scorer.update()
            optimizer.step()
            schedule.step()
            step += 1
            if prune is not None:
                target = pruning.cubic_sparsity(step, total, prune.sparsity, prune.warmup_frac, prune.final_frac)
                head_target = pruning.cubic_sparsity(step, total, head_final, prune.warmup_frac, prune.final_frac)
                if target > 0 and (step % prune.every == 0 or target >= prune.sparsity):
                    masks = pruning.select(*scorer.scores(), target, head_target, head_size=hsize)
                pruning.apply_masks(wrapper, masks)
            losses.append(float(loss.detach()))
            if progress:
                progress(f"epoch {epoch}/{cfg.epochs}", step, total)
        acc = accuracy(wrapper, *eval_set) if eval_set is not None else None
        hs, ns = masks.sparsity() if masks is not None else (0.0, 0.0)
        result.history.append(EpochResult(epoch, float(np.mean(losses)), acc, hs, ns))
        final_reached = prune is None or step >= int(total * (1 - prune.final_frac))
        score = acc if acc is not None else float(epoch)  # without eval data: keep the last epoch
        if final_reached and score >= best_acc:
            best_acc = score
            best_state = copy.deepcopy(wrapper.state_dict())
            result.best_epoch, result.best_accuracy = epoch, acc
            best_masks = copy.deepcopy(masks)
    if best_state is not None:
        wrapper.load_state_dict(best_state)
        masks = best_masks
    if prune is not None:
        pruning.apply_masks(wrapper, masks)
        result.pruning = pruning.remove_structures(wrapper, masks)
    wrapper.eval()
    result.seconds = time.perf_counter() - start
    return result


def labels_for(data, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class indices int64 [N] and class names for a labeled :class:`~edgelm.data.TextDataset`: with
    ``names`` (a fine-tuned model's labels) labels map to them; otherwise digit labels are their own
    indices (names "0", "1", ...) and text labels are sorted. Raises DataError without labels or with
    fewer than two classes."""
    from edgelm.data import label_indices

    if not data.labels:
        raise DataError(f"{data.source} has no label column: fine-tuning needs labeled examples")
    if names is None:
        raw = [str(x).strip() for x in data.labels]
        if all(x.lstrip("-").isdigit() for x in raw):
            names = [str(i) for i in range(max(int(x) for x in raw) + 1)]
        else:
            names = sorted(set(raw))
    idx = label_indices(data.labels, names)
    if len(set(idx.tolist())) < 2:
        raise DataError(f"{data.source} has only one class: a classifier needs examples of at least two")
    return idx, names


def encode_labeled(tokenizer, data, names: list[str] | None = None):
    """``((ids, mask, labels), names)`` for a labeled data set (see :func:`labels_for`)."""
    from edgelm.data import encode

    labels, names = labels_for(data, names)
    ids, mask = encode(tokenizer, data)
    return (ids, mask, labels), names


def load_classifier(
    model: str | os.PathLike | None, names: list[str] | None = None, pooling: str = "cls", loaded: Any = None
):
    """A classifier wrapper to train: a ``*ForSequenceClassification`` checkpoint as it is, or any supported
    encoder (``"default"``: the packaged MiniLM) with a new classification head for ``names`` reading the
    ``pooling`` (``"cls"``, ``"mean"`` or ``"mean-l2"``, see ``SequenceClassifier``) of the last hidden states.
    ``loaded``: ``model`` already loaded by :func:`edgelm.models.load_model` (not loaded again; a classifier's
    module is then the one trained). Returns ``(wrapper, hf_model, LoadedModel)``. Raises ModelError."""
    import transformers

    from edgelm.models import build_wrappers, load_model

    loaded = loaded if loaded is not None else load_model(model)
    if loaded.task.uses_labels:
        return loaded.module, loaded.module.model, loaded
    if not names:
        raise ModelError("a new classification head needs class names (labeled training data)")
    transformers.logging.set_verbosity_error()
    try:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            loaded.source,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            attn_implementation="eager",
        )
    except Exception as exc:
        raise ModelError(f"could not build a classifier from {loaded.source}: {exc}") from None
    if pooling != "cls" and loaded.config.get("model_type") != "bert":
        raise ModelError(
            f"mean pooling needs a BERT encoder; {loaded.source} is {loaded.config.get('model_type')}: "
            "use --pooling cls"
        )
    _, SequenceClassifier = build_wrappers()
    if pooling != "cls":
        hf.config.edgelm_pooling = pooling
    return SequenceClassifier(hf, pooling=pooling), hf, loaded


def save_checkpoint(
    hf_model: Any,
    tokenizer_dir: Path,
    out: Path,
    extra: dict | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files, and
    ``edgelm_training.json`` with ``extra``) to ``out`` atomically (:func:`edgelm.fsutil.write_directory`).
    ``write_more(directory)`` adds files before the rename. Returns ``out``."""

    def fill(tmp: Path) -> None:
        hf_model.save_pretrained(tmp)
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if extra is not None:
            (tmp / "edgelm_training.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
        if write_more is not None:
            write_more(tmp)

    return write_directory(out, fill)


def teacher_copy(wrapper: Any) -> Any:
    """A frozen copy of ``wrapper`` in eval mode to distill from."""
    teacher = copy.deepcopy(wrapper).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
