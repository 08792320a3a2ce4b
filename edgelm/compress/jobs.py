"""The ``edgelm finetune`` and ``edgelm compress`` jobs: read data, train, write a checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from edgelm.compress import pruning
from edgelm.compress.train import (
    DistillConfig,
    FitResult,
    Progress,
    PruneConfig,
    TrainConfig,
    accuracy,
    encode_labeled,
    fit,
    load_classifier,
    save_checkpoint,
    teacher_copy,
)
from edgelm.data import load_dataset, load_tokenizer
from edgelm.errors import ModelError, RecipeError

#: Pruning methods of ``edgelm compress``.
METHODS = ("platon", "magnitude")


def _data(path, limit, text_column, label_column, tokenizer, names):
    data = load_dataset(path, text_column=text_column, label_column=label_column, limit=limit)
    return encode_labeled(tokenizer, data, names)


def run_finetune(
    model: str | os.PathLike | None,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | None = None,
    cfg: TrainConfig | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress: Progress | None = None,
) -> FitResult:
    """Fine-tune ``model`` (an encoder or a classifier checkpoint; ``"default"``: MiniLM) into a sequence
    classifier on labeled ``data`` and write a Hugging Face checkpoint to ``out`` (the best epoch on
    ``eval_data``; the last one without it).

    Raises:
        ModelError, DataError (unlabeled data, one class, bad file), RecipeError (bad hyper-parameters).
    """
    cfg = cfg or TrainConfig()
    _check_cfg(cfg)
    from edgelm.models import load_model

    probe = load_model(model)
    tokenizer = load_tokenizer(probe.tokenizer_dir, min(cfg.seq_len, probe.max_positions))
    train, names = _data(data, limit, text_column, label_column, tokenizer, probe.labels)
    evals = _data(eval_data, eval_limit, text_column, label_column, tokenizer, names)[0] if eval_data else None
    import torch

    torch.manual_seed(cfg.seed)  # the new classification head's initialisation
    wrapper, hf, loaded = load_classifier(model, names, loaded=probe)
    result = fit(wrapper, train, evals, cfg, progress=progress)
    save_checkpoint(
        hf,
        loaded.tokenizer_dir,
        Path(out),
        {
            "job": "finetune",
            "base_model": str(loaded.source),
            "train": str(data),
            "eval": str(eval_data),
            "train_examples": len(train[0]),
            "config": asdict(cfg),
            "result": result.to_dict(),
        },
    )
    return result


#: Peak learning rate of the distillation after one-shot pruning when the caller gives none (the export's
#: ``--prune`` / ``--search`` with ``--train-data``; ``edgelm compress --method magnitude --distill`` takes
#: ``--lr``). Higher than fine-tuning's 5e-5: the pruned student starts far from its teacher.
DISTILL_LR = 1e-4


def prune_and_distill(
    wrapper,
    sparsity: float,
    train: tuple | None,
    cfg: TrainConfig,
    *,
    head_sparsity: float | None = None,
    teacher=None,
    evals: tuple | None = None,
    progress: Progress | None = None,
    after_prune=None,
) -> FitResult:
    """One-shot magnitude pruning of ``wrapper`` in place, then ``cfg.epochs`` of training on ``train``
    (int64 ids, mask [N, seq] and labels [N]), distilled from ``teacher`` when given. The one prune +
    distill both ``edgelm compress --method magnitude`` and the export's ``--prune``/``--search`` run.
    ``after_prune(wrapper)`` is called between the two steps. Returns the fit result with the pruning
    record in ``.pruning``."""
    record = pruning.prune_one_shot(wrapper, sparsity, head_sparsity)
    if after_prune is not None:
        after_prune(wrapper)
    result = (
        fit(wrapper, train, evals, cfg, teacher=teacher, progress=progress) if cfg.epochs and train else FitResult()
    )
    result.pruning = record
    return result


def run_compress(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sparsity: float = 0.5,
    head_sparsity: float | None = None,
    method: str = "platon",
    distill: bool = False,
    eval_data: str | os.PathLike | None = None,
    cfg: TrainConfig | None = None,
    limit: int | None = None,
    eval_limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress: Progress | None = None,
) -> tuple[FitResult, dict]:
    """Prune heads and FFN neurons of a fine-tuned classifier and write the smaller checkpoint to ``out``.

    - ``method="platon"``: PLATON importance with a cubic schedule while training ``cfg.epochs`` on ``data``;
      with ``distill`` the fine-tuned model is the teacher throughout (HomoDistil-style).
    - ``method="magnitude"``: one-shot magnitude pruning, then ``cfg.epochs`` of fine-tuning (or of
      distillation from the unpruned model with ``distill``; ``epochs=0`` skips training).

    Returns ``(fit result, summary)`` where summary has parameters before/after and accuracies (%).
    Raises ModelError (not a classifier), DataError, RecipeError (bad sparsity or method).
    """
    cfg = cfg or TrainConfig(epochs=2)
    _check_cfg(cfg, allow_zero_epochs=method == "magnitude")
    if method not in METHODS:
        raise RecipeError(f"unknown pruning method {method!r}: use {' or '.join(METHODS)}")
    for v in (sparsity, head_sparsity if head_sparsity is not None else sparsity):
        if not 0.0 <= v < 1.0:
            raise RecipeError(f"sparsity {v} is out of range: use 0 <= sparsity < 1 (0.5 removes half)")
    loaded = load_fine_tuned(model, "compress the fine-tuned checkpoint (pruning importance needs the task's loss)")
    tokenizer = load_tokenizer(loaded.tokenizer_dir, min(cfg.seq_len, loaded.max_positions))
    train, names = _data(data, limit, text_column, label_column, tokenizer, loaded.labels)
    evals = _data(eval_data, eval_limit, text_column, label_column, tokenizer, names)[0] if eval_data else None
    wrapper = loaded.module
    params_before = pruning.encoder_parameter_count(wrapper)
    acc_before = accuracy(wrapper, *evals) if evals else None
    teacher = teacher_copy(wrapper) if distill else None
    if method == "magnitude":
        one_shot = []
        result = prune_and_distill(
            wrapper,
            sparsity,
            train,
            cfg,
            head_sparsity=head_sparsity,
            teacher=teacher,
            evals=evals,
            progress=progress,
            after_prune=lambda w: one_shot.append(accuracy(w, *evals) if evals else None),
        )
        acc_one_shot = one_shot[0]
    else:
        acc_one_shot = None
        result = fit(
            wrapper,
            train,
            evals,
            cfg,
            prune=PruneConfig(sparsity=sparsity, head_sparsity=head_sparsity),
            teacher=teacher,
            progress=progress,
        )
    summary = {
        "method": method,
        "distill": distill,
        "sparsity": sparsity,
        "head_sparsity": sparsity if head_sparsity is None else head_sparsity,
        "encoder_parameters_before": params_before,
        "encoder_parameters_after": pruning.encoder_parameter_count(wrapper),
        "heads_per_layer": pruning.structure_counts(wrapper)[0],
        "ffn_neurons_per_layer": pruning.structure_counts(wrapper)[1],
        "accuracy_before": acc_before,
        "accuracy_after_one_shot": acc_one_shot,
        "accuracy_after": accuracy(wrapper, *evals) if evals else None,
    }
    save_checkpoint(
        wrapper.model,
        loaded.tokenizer_dir,
        Path(out),
        {
            "job": "compress",
            "source": str(loaded.source),
            "train": str(data),
            "config": asdict(cfg),
            "distill": asdict(DistillConfig()) if distill else None,
            "summary": summary,
            "result": result.to_dict(),
        },
    )
    return result, summary


def load_fine_tuned(model: str | os.PathLike, then: str):
    """Load ``model``, which must be a sequence classifier (from ``edgelm finetune``); ``then``: what to do with
    it once fine-tuned, for the error. Raises ModelError."""
    from edgelm.models import load_model

    loaded = load_model(model)
    if not loaded.task.prunable:
        raise ModelError(f"{loaded.source} is not a sequence classifier: run `edgelm finetune` first, then {then}")
    return loaded


def _check_cfg(cfg: TrainConfig, allow_zero_epochs: bool = False) -> None:
    if cfg.epochs < (0 if allow_zero_epochs else 1):
        raise RecipeError(f"--epochs {cfg.epochs}: use 1 or more")
    if cfg.batch_size < 1:
        raise RecipeError(f"--batch-size {cfg.batch_size}: use 1 or more")
    if not 0 < cfg.lr < 1:
        raise RecipeError(f"--lr {cfg.lr}: use a learning rate in (0, 1), e.g. 5e-5")
    if cfg.optimizer not in ("adamw", "sage"):
        raise RecipeError(f"unknown optimizer {cfg.optimizer!r}: use adamw or sage")
    if not 2 <= cfg.seq_len <= 512:
        raise RecipeError(f"--seq-len {cfg.seq_len}: use 2..512 tokens")
