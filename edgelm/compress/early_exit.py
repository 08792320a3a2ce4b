"""Early exit (off-ramps) for encoder classifiers, and its export as segments that exit for real.

Method: an exit head (masked mean pooling -> Linear(H, H) -> tanh -> Linear(H, C)) after chosen encoder
layers of a fine-tuned classifier (default: every second layer; the last exit is the classifier's own head),
trained by self-distillation from the final layer's logits plus the task loss (DeeBERT, Xin et al. ACL 2020;
the joint, weighted training of BERxiT, Xin et al. EACL 2021; Hu's dynamic inference for BERT, whose
off-ramps choose each input's depth). At inference the first exit whose confidence passes a threshold answers
(:mod:`exporters.cascade`); the threshold is chosen on labeled data to meet an accuracy budget
(:func:`choose_threshold`).

Checkpoint layout (``edgelm compress --method early-exit``): a Hugging Face classifier checkpoint (the whole
model; it exports and validates like any classifier) plus ``early_exit.json`` (exit layers, confidence measure,
head) and ``exit_heads.safetensors`` (the exit heads' weights); ``edgelm_training.json`` keeps the training
history and, with eval data, each exit's accuracy and the threshold sweep.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DataError, ModelError, RecipeError
from edgelm.fsutil import read_json_sidecar
from exporters.cascade import CONFIDENCES

EXITS_FILE = "early_exit.json"
HEADS_FILE = "exit_heads.safetensors"


def read_exit_config(directory: str | os.PathLike) -> dict | None:
    """``early_exit.json`` of a checkpoint, or None when it has none. Raises ModelError when it is unreadable."""
    path = Path(directory) / EXITS_FILE
    again = "run `edgelm compress --method early-exit` again"
    cfg = read_json_sidecar(path, again)
    if cfg is None:
        return None
    try:
        cfg["exit_layers"] = [int(x) for x in cfg["exit_layers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is corrupt ({exc}): {again}") from None
    return cfg


def check_exit_layers(exit_layers: list[int], num_layers: int) -> list[int]:
    """Sorted exit layers (1-based); the last layer is always an exit. Raises RecipeError for layers outside
    1..num_layers."""
    bad = [x for x in exit_layers if not 1 <= x <= num_layers]
    if bad:
        raise RecipeError(f"--exits {bad}: the model has encoder layers 1..{num_layers}")
    return sorted(set(exit_layers) | {num_layers})


def default_exit_layers(num_layers: int) -> list[int]:
    """Every second layer: [2, 4, 6] for MiniLM-L6; [1] for a one-layer model."""
    return list(range(2, num_layers + 1, 2)) if num_layers > 1 else [1]


def build_classes():
    """The torch classes (defined lazily so that importing this module does not import torch)."""
    import torch

    from edgelm.models import MASK_VALUE, mean_pool

    class ExitHead(torch.nn.Module):
        """Off-ramp: hidden float32 [batch, seq, H] + mask -> logits float32 [batch, C]."""

        def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
            super().__init__()
            self.dense = torch.nn.Linear(hidden, hidden)
            self.dropout = torch.nn.Dropout(dropout)
            self.classifier = torch.nn.Linear(hidden, num_labels)

        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.from_pooled(mean_pool(hidden, attention_mask))

        def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
            """Logits from the masked mean of the hidden states, float32 [batch, H]."""
            return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))

    class EarlyExitModel(torch.nn.Module):
        """A ``SequenceClassifier`` wrapper with exit heads after ``exit_layers`` (1-based; the last layer's
        exit is the wrapper's own head). ``forward`` is the whole model (logits [batch, C]);
        :meth:`exit_logits` gives every exit's logits."""

        output_name = "logits"

        def __init__(self, wrapper: torch.nn.Module, exit_layers: list[int]):
            super().__init__()
            if wrapper.prompt_embeddings() is not None:
                raise ModelError("a prompt-tuned classifier cannot take exits: merge or re-train it with LoRA")
            self.wrapper = wrapper
            self.exit_layers = list(exit_layers)
            cfg = wrapper.model.config
            self.heads = torch.nn.ModuleList(ExitHead(cfg.hidden_size, cfg.num_labels) for _ in self.exit_layers[:-1])

        @property
        def layers(self):
            return self.wrapper.base.encoder.layer

        def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
            ids = input_ids.to(torch.int64)
            return self.wrapper.base.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))

        def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, first: int, last: int):
            """Encoder layers ``first``..``last`` (1-based, inclusive) on hidden float32 [batch, seq, H]."""
            additive = (1.0 - attention_mask.to(torch.float32)[:, None, None, :]) * MASK_VALUE
            for layer in self.layers[first - 1 : last]:
                hidden = layer(hidden, additive)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
            return hidden

        def head(self, k: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """Exit ``k``'s logits (the last exit: the classifier's own head)."""
            if k == len(self.exit_layers) - 1:
                return self.wrapper._head(hidden, attention_mask)
            return self.heads[k](hidden, attention_mask)

        def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
            """Every exit's logits, float32 [batch, C] each, in layer order."""
            hidden, first, out = self.embed(input_ids), 1, []
            for k, last in enumerate(self.exit_layers):
                hidden = self.run_layers(hidden, attention_mask, first, last)
                out.append(self.head(k, hidden, attention_mask))
                first = last + 1
            return out

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.exit_logits(input_ids, attention_mask)[-1]

        def pooled(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[list[torch.Tensor], torch.Tensor]:
            """What each exit head but the last reads (the masked mean of its layer's hidden states, float32
            [batch, H] each) and the whole model's logits [batch, C], from one pass (the frozen-backbone
            training caches both)."""
            hidden, first, out = self.embed(input_ids), 1, []
            for last in self.exit_layers[:-1]:
                hidden = self.run_layers(hidden, attention_mask, first, last)
                out.append(mean_pool(hidden, attention_mask))
                first = last + 1
            hidden = self.run_layers(hidden, attention_mask, first, self.exit_layers[-1])
            return out, self.head(len(self.exit_layers) - 1, hidden, attention_mask)

    class Segment(torch.nn.Module):
        """Segment ``k`` of an :class:`EarlyExitModel` for export: layers after exit k-1 up to exit k.
        Segment 0 takes (input_ids, attention_mask), later ones (hidden_states float32 [1, seq, H],
        attention_mask); all but the last return (hidden_out, logits), the last returns logits."""

        def __init__(self, model: EarlyExitModel, k: int):
            super().__init__()
            self.model, self.k = model, k
            self.first = 1 if k == 0 else model.exit_layers[k - 1] + 1
            self.last = model.exit_layers[k]
            self.is_last = k == len(model.exit_layers) - 1

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor):
            hidden = self.model.embed(x) if self.k == 0 else x
            hidden = self.model.run_layers(hidden, attention_mask, self.first, self.last)
            logits = self.model.head(self.k, hidden, attention_mask)
            return logits if self.is_last else (hidden, logits)

    return ExitHead, EarlyExitModel, Segment


def attach(wrapper: Any, exit_layers: list[int]) -> Any:
    """An :class:`EarlyExitModel` around a loaded ``SequenceClassifier`` with new (random) exit heads."""
    _, EarlyExitModel, _ = build_classes()
    return EarlyExitModel(wrapper, check_exit_layers(exit_layers, len(wrapper.base.encoder.layer)))


def load_early_exit(directory: str | os.PathLike, loaded: Any = None) -> tuple[Any, dict]:
    """The :class:`EarlyExitModel` of an early-exit checkpoint (eval mode) and its ``early_exit.json``.
    ``loaded``: the checkpoint already loaded by :func:`edgelm.models.load_model`. Raises ModelError when the
    checkpoint has no exits, or its exit heads' weights do not cover the heads."""
    import torch
    from safetensors.torch import load_file

    from edgelm.models import load_model

    cfg = read_exit_config(directory)
    if cfg is None:
        raise ModelError(f"{directory} has no {EXITS_FILE}: make one with `edgelm compress --method early-exit`")
    loaded = loaded if loaded is not None else load_model(directory)
    if not loaded.task.uses_labels:
        raise ModelError(f"{directory}: early exit needs a sequence classifier")
    try:
        model = attach(loaded.module, cfg["exit_layers"])
    except RecipeError as exc:
        raise ModelError(f"{Path(directory) / EXITS_FILE} does not fit the model: {exc}") from None
    try:
        state = load_file(str(Path(directory) / HEADS_FILE))
        missing, unexpected = model.heads.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"the exit heads in {directory} are missing or corrupt ({exc}); compress again") from None
    if missing or unexpected:
        raise ModelError(
            f"{HEADS_FILE} in {directory} does not cover the exit heads (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}): the weights and {EXITS_FILE} do not match"
        )
    with torch.no_grad():
        model.eval()
    return model, cfg


def exit_logits(model: Any, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """Every exit's PyTorch logits on int64 [N, seq] ``ids``/``mask``: a list of float32 [N, C]."""
    import torch

    from edgelm.compress.train import _trim

    model.eval()
    outs: list[list[np.ndarray]] = [[] for _ in model.exit_layers]
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x, m = _trim(ids[i : i + batch_size], mask[i : i + batch_size])
            for k, z in enumerate(model.exit_logits(x, m)):
                outs[k].append(z.numpy().astype(np.float32))
    return [np.concatenate(o, axis=0) for o in outs]


@dataclass
class OperatingPoint:
    """One threshold's outcome on labeled data.

    Attributes:
        threshold: the confidence threshold (``max_prob``: exit when >=; ``entropy``: when <=).
        accuracy: %, of the early-exit predictions.
        mean_layers: encoder layers run per input on average (the full model runs all).
        exit_share: share of inputs answered by each exit, 0-1, in layer order.
    """

    threshold: float
    accuracy: float
    mean_layers: float
    exit_share: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def operating_point(
    logits: list[np.ndarray], labels: np.ndarray, exit_layers: list[int], measure: str, threshold: float
) -> OperatingPoint:
    """The outcome of ``threshold`` given every exit's logits (float [N, C] each) and labels int64 [N]."""
    from exporters.cascade import exit_choice

    chosen = exit_choice(logits, measure, threshold)
    stacked = np.stack([z.argmax(axis=1) for z in logits])  # [exits, N]
    preds = stacked[chosen, np.arange(len(labels))]
    share = np.bincount(chosen, minlength=len(logits)) / len(labels)
    return OperatingPoint(
        threshold=float(threshold),
        accuracy=float((preds == labels).mean() * 100.0),
        mean_layers=float(np.asarray(exit_layers, np.float64)[chosen].mean()),
        exit_share=[float(x) for x in share],
    )


def threshold_candidates(logits: list[np.ndarray], measure: str, n: int = 200) -> list[float]:
    """Thresholds to sweep: quantiles of the non-final exits' confidences, plus one that never exits early."""
    from exporters.cascade import confidence, never_exit

    conf = np.concatenate([confidence(z, measure) for z in logits[:-1]]) if len(logits) > 1 else np.zeros(0)
    never = never_exit(measure)
    if conf.size == 0:
        return [never]
    qs = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, n)))
    return sorted({float(x) for x in qs} | {never}, reverse=measure == "max_prob")


def choose_threshold(
    logits: list[np.ndarray],
    labels: np.ndarray,
    exit_layers: list[int],
    reference_accuracy: float,
    max_drop: float,
    measure: str = "max_prob",
) -> tuple[OperatingPoint, list[OperatingPoint]]:
    """The threshold with the fewest layers run on average whose accuracy drop against
    ``reference_accuracy`` (%, the whole model's) is at most ``max_drop`` points (ties: the more accurate).
    Returns ``(chosen, every point swept)``; "never exit early" is always a candidate, so a budget the exits
    cannot meet gives the whole model."""
    if measure not in CONFIDENCES:
        raise RecipeError(f"unknown --confidence {measure!r}: use {' or '.join(CONFIDENCES)}")
    points = [operating_point(logits, labels, exit_layers, measure, t) for t in threshold_candidates(logits, measure)]
    ok = [p for p in points if reference_accuracy - p.accuracy <= max_drop + 1e-9]
    chosen = min(ok or points[:1], key=lambda p: (p.mean_layers, -p.accuracy))  # points[0]: never exit early
    return chosen, points


@dataclass
class ExitTrainResult:
    """What :func:`train_exits` did: per epoch the loss and each exit's eval accuracy (%), and seconds."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _pooled_features(
    model: Any, ids: np.ndarray, mask: np.ndarray, batch_size: int = 64
) -> tuple[list[np.ndarray], np.ndarray]:
    """:meth:`EarlyExitModel.pooled` over int64 [N, seq] ``ids``/``mask`` in batches: float32 [N, H] per exit
    head, and the whole model's logits float32 [N, C]."""
    import torch

    from edgelm.compress.train import _trim

    model.eval()
    outs: list[list[np.ndarray]] = [[] for _ in model.heads]
    final = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            feats, logits = model.pooled(*_trim(ids[i : i + batch_size], mask[i : i + batch_size]))
            for k, f in enumerate(feats):
                outs[k].append(f.numpy())
            final.append(logits.numpy().astype(np.float32))
    return [np.concatenate(o, axis=0) for o in outs], np.concatenate(final, axis=0)


def train_exits(
    model: Any,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    evals: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    cfg: Any,
    *,
    freeze_backbone: bool = False,
    temperature: float = 2.0,
    alpha: float = 0.5,
    progress: Any = None,
) -> ExitTrainResult:
    """Train the exits of ``model`` (in place) on ``train = (ids int64 [N, seq], mask, labels int64 [N])``.

    Each exit's loss is ``(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || exit)`` where the teacher is the
    whole model's final logits before training (self-distillation); the final exit trains with the same loss,
    so joint training keeps the whole model close to what it was. With ``freeze_backbone`` only the exit heads
    train (the whole model is unchanged), on what they read computed once (the pooled hidden states: an epoch
    then costs a few seconds). ``cfg``: :class:`edgelm.compress.train.TrainConfig`. Raises DataError
    for an empty training set."""
    import torch
    import torch.nn.functional as F

    from edgelm.compress.sage import linear_schedule, make_optimizer
    from edgelm.compress.train import _batches, _trim, optimizer_step

    ids, mask, labels = train
    if len(ids) == 0:
        raise DataError("the training set is empty")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    # the teacher: the whole model's logits before any training; frozen, the layers run once for both
    if freeze_backbone:
        pooled, teacher = _pooled_features(model, ids, mask)
    else:
        pooled, teacher = None, exit_logits(model, ids, mask)[-1]
    for p in model.wrapper.parameters():
        p.requires_grad_(not freeze_backbone)
    trainable = model.heads if freeze_backbone else model
    steps = ((len(ids) + cfg.batch_size - 1) // cfg.batch_size) * cfg.epochs
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.lr, cfg.weight_decay)
    schedule = linear_schedule(optimizer, steps)
    result, step = ExitTrainResult(), 0

    def loss_of(z: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kl = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        return (1 - alpha) * F.cross_entropy(z, y) + alpha * temperature**2 * kl

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if freeze_backbone:
            model.wrapper.eval()
        losses = []
        for idx in _batches(len(ids), cfg.batch_size, rng):
            y = torch.from_numpy(labels[idx])
            t = torch.from_numpy(teacher[idx]) / temperature
            if pooled is not None:
                zs = [head.from_pooled(torch.from_numpy(f[idx])) for head, f in zip(model.heads, pooled, strict=True)]
            else:
                zs = model.exit_logits(*_trim(ids[idx], mask[idx]))
            loss = sum(loss_of(z, y, t) for z in zs) / len(zs)
            losses.append(optimizer_step(loss, optimizer, trainable.parameters(), schedule))
            step += 1
            if progress:
                progress(f"exits, epoch {epoch}/{cfg.epochs}", step, steps)
        row: dict = {"epoch": epoch, "loss": float(np.mean(losses))}
        if evals is not None:
            z = exit_logits(model, evals[0], evals[1])
            row["exit_accuracy"] = [float((x.argmax(1) == evals[2]).mean() * 100) for x in z]
        result.history.append(row)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def run_early_exit(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    exit_layers: list[int] | None = None,
    eval_data: str | os.PathLike | None = None,
    cfg: Any = None,
    freeze_backbone: bool = True,
    confidence_measure: str = "max_prob",
    max_drop: float = 1.0,
    limit: int | None = None,
    eval_limit: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress: Any = None,
) -> dict:
    """``edgelm compress --method early-exit``: add exits to a fine-tuned classifier, train them (by default
    only the heads: ``freeze_backbone``), and write the early-exit checkpoint to ``out`` (see the module
    docstring). With ``eval_data`` the summary has each
    exit's accuracy and the threshold sweep, and the threshold meeting ``max_drop`` points (the export chooses
    its own on its ``--data``). Returns the summary dict. Raises ModelError (not a classifier), DataError,
    RecipeError (bad exits, measure or hyper-parameters)."""
    from safetensors.torch import save_file

    from edgelm.compress.jobs import _check_cfg, _data, load_fine_tuned
    from edgelm.compress.train import TrainConfig, save_checkpoint
    from edgelm.data import load_tokenizer

    cfg = cfg or (TrainConfig(epochs=10, lr=1e-3) if freeze_backbone else TrainConfig(epochs=2, lr=5e-5))
    _check_cfg(cfg)
    if confidence_measure not in CONFIDENCES:
        raise RecipeError(f"unknown --confidence {confidence_measure!r}: use {' or '.join(CONFIDENCES)}")
    loaded = load_fine_tuned(model, "add exits to the fine-tuned checkpoint")
    if read_exit_config(loaded.source) is not None:
        raise ModelError(f"{loaded.source} already has exits: start from the fine-tuned classifier")
    num_layers = len(loaded.module.base.encoder.layer)
    layers = check_exit_layers(exit_layers or default_exit_layers(num_layers), num_layers)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, min(cfg.seq_len, loaded.max_positions))
    train, names = _data(data, limit, text_column, label_column, tokenizer, loaded.labels)
    evals = _data(eval_data, eval_limit, text_column, label_column, tokenizer, names)[0] if eval_data else None
    ee = attach(loaded.module, layers)
    before = None
    if evals is not None:
        before = float((exit_logits(ee, evals[0], evals[1])[-1].argmax(1) == evals[2]).mean() * 100)
    result = train_exits(ee, train, evals, cfg, freeze_backbone=freeze_backbone, progress=progress)
    summary: dict = {
        "method": "early-exit",
        "exit_layers": layers,
        "num_layers": num_layers,
        "confidence": confidence_measure,
        "freeze_backbone": freeze_backbone,
        "accuracy_before": before,
        "history": result.history,
        "seconds": result.seconds,
    }
    if evals is not None:
        z = exit_logits(ee, evals[0], evals[1])
        summary["exit_accuracy"] = [float((x.argmax(1) == evals[2]).mean() * 100) for x in z]
        chosen, points = choose_threshold(z, evals[2], layers, before, max_drop, confidence_measure)
        summary["eval"] = {
            "source": str(eval_data),
            "max_accuracy_drop": max_drop,
            "chosen": chosen.to_dict(),
            "sweep": [p.to_dict() for p in points],
        }
    config = {k: summary[k] for k in ("exit_layers", "num_layers", "confidence")}
    config["head"] = "mean pooling -> Linear(H, H) -> tanh -> Linear(H, C)"

    def write_more(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in ee.heads.state_dict().items()}, str(tmp / HEADS_FILE))
        (tmp / EXITS_FILE).write_text(json.dumps(config, indent=2) + "\n")

    save_checkpoint(
        loaded.module.model,
        loaded.tokenizer_dir,
        Path(out),
        {"job": "compress", "source": str(loaded.source), "train": str(data), "summary": summary},
        write_more=write_more,
    )
    return summary


def export_cascade(
    model: Any,
    fmt: str,
    quant: Any,
    seq_len: int,
    path: Path,
    *,
    confidence_measure: str = "max_prob",
    threshold: float | None = None,
    seq_buckets: tuple[int, ...] | None = None,
) -> Any:
    """Export ``model`` (an :class:`EarlyExitModel`) as an early-exit cascade: one ``fmt`` artifact per
    segment beside ``path`` (``m.onnx.exits.json`` -> ``m.seg0.onnx`` ...) quantized by ``quant`` (an
    :class:`exporters.QuantSpec`), and the description at ``path`` with the policy (see
    :mod:`exporters.cascade`; ``threshold`` None: never exit early). Returns an :class:`exporters.Artifact` whose file is the description and whose
    companions are the segments (their sizes add up to the artifact's). Raises exporters' errors
    (UnsupportedQuantError for ``int8_static``: the segments after the first would need calibrated hidden
    states)."""
    import torch

    import exporters
    from exporters.cascade import Cascade, Segment, inner_name, never_exit

    if quant.scheme == "int8_static":
        raise exporters.UnsupportedQuantError(
            "an early-exit cascade cannot use int8_static (each segment would need its own calibration): "
            "use int8_dynamic"
        )
    _, _, SegmentModule = build_classes()
    path = Path(path)
    stem, suffix = Path(inner_name(path)).stem, exporters.suffix(fmt)
    hidden = model.wrapper.model.config.hidden_size
    start, segments, files, details = time.perf_counter(), [], [], []
    for k in range(len(model.exit_layers)):
        seg = SegmentModule(model, k).eval()
        first = k == 0
        example = {
            ("input_ids" if first else "hidden_states"): torch.ones(1, seq_len, dtype=torch.int64)
            if first
            else torch.zeros(1, seq_len, hidden),
            "attention_mask": torch.ones(1, seq_len, dtype=torch.int64),
        }
        last = k == len(model.exit_layers) - 1
        options = exporters.ExportOptions(
            output_names=("logits",) if last else ("hidden_out", "logits"), seq_buckets=seq_buckets
        )
        art = exporters.get(fmt).export(seg, example, quant, path.parent / f"{stem}.seg{k}{suffix}", options)
        segments.append(Segment(art.path.name, seg.first, seg.last, exporters.sha256_file(art.path)))
        if first:  # the cascade's inputs are its first segment's (int32 in LiteRT)
            inputs = art.inputs
        files.append(art.path)
        details.append(art.details)
    threshold = never_exit(confidence_measure) if threshold is None else float(threshold)
    cascade = Cascade(fmt, tuple(segments), confidence_measure, threshold, "logits", len(model.layers))
    cascade.write(path)
    return exporters.Artifact(
        path=path,
        format=fmt,
        quant=quant,
        inputs=inputs,
        outputs=[
            exporters.TensorSpec("logits", "float32", (1, model.wrapper.model.config.num_labels)),
            exporters.TensorSpec("exit_layer", "float32", (1,)),
        ],
        runtime=art.runtime,
        details={"early_exit": cascade.to_dict(), "segments": details},
        export_seconds=time.perf_counter() - start,
        companions=files,
        companion_role="early-exit segment",
    )


def reference_key(artifact: str) -> str:
    """The golden-set key of an early-exit cascade's PyTorch reference (the PyTorch cascade at its threshold)."""
    return "reference_exits_" + artifact.split(".exits.json")[0].replace(".", "_")


@dataclass
class CascadeExport:
    """One exported cascade: its artifact, the PyTorch cascade's golden logits at its threshold (float32
    [N, C]) and how the threshold was chosen (data, budget, the chosen point, the whole-cascade accuracy)."""

    artifact: Any
    reference: np.ndarray
    choice: dict


def export_cascades(
    model: Any,
    plans: list[Any],
    seq_len: int,
    directory: Path,
    choose: tuple[np.ndarray, np.ndarray, np.ndarray],
    golden: tuple[np.ndarray, np.ndarray],
    *,
    measure: str = "max_prob",
    threads: int | None = None,
    source: str = "",
    step: Any = None,
) -> list[CascadeExport]:
    """For each recipe plan (format + scheme + gates), export ``model``'s cascade as
    ``<plan artifact>.exits.json`` in ``directory`` and choose its threshold on ``choose`` = (ids, mask int64
    [M, seq], labels int64 [M]) from the artifact's own exits, run in its runtime here: the fewest layers whose
    accuracy is within the plan's ``max_accuracy_drop`` of the whole PyTorch fp32 model's on the same rows
    (:func:`choose_threshold`). ``golden``: the golden inputs, for the PyTorch cascade reference. ``step(desc)``
    reports progress. Raises exporters' errors for a plan the format cannot do."""
    import exporters
    from exporters.cascade import Cascade, exit_choice

    ids, mask, labels = choose
    torch_choose = exit_logits(model, ids, mask)
    whole = float((torch_choose[-1].argmax(1) == labels).mean() * 100)
    torch_golden = exit_logits(model, *golden)
    rows = np.arange(len(golden[0]))
    out = []
    for plan in plans:
        name = f"{plan.artifact_name}{exporters.cascade.SUFFIX}"
        if step:
            step(f"exporting the {plan.format} {plan.quant.scheme} early-exit cascade")
        art = export_cascade(model, plan.format, plan.quant, seq_len, directory / name, confidence_measure=measure)
        session = exporters.load(art.path, threads=threads)
        logits = session.run_all({"input_ids": ids, "attention_mask": mask})
        chosen, _ = choose_threshold(logits, labels, model.exit_layers, whole, plan.gates.max_accuracy_drop, measure)
        cascade = Cascade.read(art.path)
        cascade = Cascade(**{**cascade.__dict__, "threshold": chosen.threshold})
        cascade.write(art.path)
        art.details["early_exit"] = cascade.to_dict()
        choice = {
            "data": source,
            "rows": len(labels),
            "max_accuracy_drop": plan.gates.max_accuracy_drop,
            "pytorch_accuracy": whole,
            "artifact_accuracy_no_exit": float((logits[-1].argmax(1) == labels).mean() * 100),
            "chosen": chosen.to_dict(),
        }
        art.details["threshold_choice"] = choice
        chosen_golden = exit_choice(torch_golden, measure, chosen.threshold)
        reference = np.stack(torch_golden)[chosen_golden, rows].astype(np.float32)
        out.append(CascadeExport(art, reference, choice))
    return out
