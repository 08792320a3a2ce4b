"""A hypernetwork that writes a task's LoRA weights and classifier head from K labeled demonstrations, with
no gradient step at adaptation time.

After Liang's thesis line of work on hypernetworks that generate task-specific weights from few-shot
demonstrations, using the weights' intrinsic (low-rank, layer-shared) structure as the inductive bias; the
task-conditioned LoRA generation follows HyperTuning (Phang et al., "HyperTuning: Toward Adapting Large
Language Models without Back-propagation", ICML 2023) and the shared low-rank basis per layer follows the
observation that fine-tuning updates have a low intrinsic rank (Aghajanyan et al., ACL 2021; Hu et al.,
LoRA, ICLR 2022).

Parameterisation, for a frozen BERT-family backbone with hidden size d and L layers, target Linears
``t = 1..6L`` (query, key, value, attention output, FFN intermediate, FFN output of every layer):

1. **Task encoder.** Each demonstration is encoded by the frozen backbone (masked mean pooling, L2-normalised)
   to ``e_i`` float32 [d]. Class prototypes ``p_c = mean_{y_i = c} e_i``; the task code is
   ``z = MLP([mean_c p_c ; mean_c |p_c - mean_c p_c|])`` float32 [task_dim]: invariant to the order of the
   demonstrations and of the classes, so it works for any number of classes.
2. **Shared-basis LoRA.** Every target t has a meta-learned basis ``A_t`` [r, d_in] and ``B_t`` [d_out, r]
   shared by all tasks; the task only chooses an r x r mixing matrix ``C_t(z) = reshape(W_t z + b_t)``, so the
   weight update is ``ΔW_t = B_t C_t(z) A_t`` (rank <= r), emitted as peft LoRA weights
   ``lora_A = C_t(z) A_t``, ``lora_B = B_t`` with scaling 1. ``W_t, b_t`` start at 0: before meta-training the
   backbone is unchanged.
3. **Head from the demonstrations.** The adapted backbone re-encodes the demonstrations (masked mean,
   L2-normalised: the cosine geometry MiniLM was trained in) into prototypes ``P_c``; the classifier is the nearest-prototype rule as a linear layer,
   ``logits_c = τ (2 P_c · h - |P_c|²)`` (weight ``2τ P_c``, bias ``-τ |P_c|²``; the ``-τ|h|²`` term is the
   same for every class), with the temperature τ meta-learned (from 10).

Meta-training (``edgelm hypernet train``) samples episodes from the shared tasks (CoLA, MRPC, RTE, QNLI,
TREC, AG News, CB; SST-2 held out for evaluation, SMS Spam held out for meta-validation): a task, up to
``max_classes`` of its classes, K support and ``query`` query examples per class; the loss is the
cross-entropy of the query examples under the head built from the support examples through the generated
LoRA. Only the hypernetwork is trained. Model selection and early stopping use the held-out meta-validation
task, as HyperTuning selects on held-out tasks.

At adaptation time the generated LoRA and head are used alone (no gradient step) or as the initialisation of
a few LoRA steps on the same demonstrations (:func:`adapt_with_hypernetwork` with ``steps``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DataError, ModelError, RecipeError

#: Linear layers of each encoder layer that receive generated LoRA weights (module paths in the layer).
TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
WEIGHTS_FILE = "hypernet.safetensors"
#: The head's features: the masked mean of the last hidden states, L2-normalised (cosine geometry).
POOLING = "mean-l2"
CONFIG_FILE = "hypernet.json"


@dataclass
class HyperConfig:
    """Hypernetwork shape and meta-training settings.

    Attributes:
        rank: rank r of the generated LoRA updates.
        task_dim: size of the task code z.
        episodes: meta-training episodes.
        shots: K values sampled per episode (support examples per class).
        query: query examples per class per episode.
        max_classes: at most this many classes per episode.
        lr: AdamW learning rate of the hypernetwork.
        seq_len: max tokens per example.
        per_task: examples read per task (seeded subset).
        seed: seeds the episode sampling and the initialisation.
        tasks: meta-training tasks (:data:`edgelm.adapt.tasks.READERS` names; empty: every task but the
            held-out SST-2 and ``val_task``).
        val_task: the held-out *meta-validation* task (never trained on; None: no validation). Every
            ``val_every`` episodes, and before the first, the hypernetwork alone is scored on ``val_episodes``
            fixed episodes of it (K = the largest of ``shots``, :data:`VAL_QUERY` queries per class); the best
            state is kept (model selection), and training stops after ``patience`` scores without a gain
            (early stopping; 0: never stops early).
    """

    rank: int = 4
    task_dim: int = 64
    episodes: int = 600
    shots: tuple[int, ...] = (4, 8)
    query: int = 4
    max_classes: int = 4
    lr: float = 1e-3
    seq_len: int = 64
    per_task: int = 2000
    seed: int = 0
    tasks: tuple[str, ...] = ()
    val_task: str | None = "sms_spam"
    val_every: int = 50
    val_episodes: int = 24
    patience: int = 4

    def meta_tasks(self) -> tuple[str, ...]:
        """The meta-training tasks: ``tasks``, or every readable task but SST-2 and ``val_task``.
        Raises RecipeError when they include the held-out or the validation task, when the validation task is
        the held-out one, or when none is left."""
        from edgelm.adapt.tasks import HELD_OUT, META_TASKS

        if self.val_task == HELD_OUT:
            raise RecipeError(f"{HELD_OUT} is the held-out evaluation task: choose another --val-task")
        tasks = self.tasks or tuple(t for t in META_TASKS if t != self.val_task)
        for name in tasks:
            if name == HELD_OUT:
                raise RecipeError(f"{HELD_OUT} is the held-out evaluation task: leave it out of --tasks")
            if name == self.val_task:
                raise RecipeError(f"{name} is the meta-validation task (--val-task): leave it out of --tasks")
        if not tasks:
            raise RecipeError("no meta-training task left: name some with --tasks")
        return tasks


#: Peak learning rate of the LoRA steps that start from the generated weights (``adapt --steps``).
DEFAULT_STEP_LR = 1e-3
#: Query examples per class in a meta-validation episode.
VAL_QUERY = 16
#: The meta-validation task reads at least this many examples (seeded subset), whatever ``per_task`` is.
VAL_EXAMPLES = 2000


def target_layers(base: Any) -> list[tuple[str, Any]]:
    """``(path, nn.Linear)`` of every target Linear of a BERT-family ``base`` model, layer by layer in
    :data:`TARGETS` order (paths like ``encoder.layer.0.attention.self.query``)."""
    out = []
    for i, layer in enumerate(base.encoder.layer):
        for t in TARGETS:
            out.append((f"encoder.layer.{i}.{t}", layer.get_submodule(t)))
    return out


def build_hypernetwork(hidden: int, shapes: list[tuple[int, int]], rank: int, task_dim: int):
    """The hypernetwork module for a backbone of ``hidden`` size whose targets have ``(d_out, d_in)`` shapes.

    ``forward(features float32 [K, hidden], labels int64 [K])`` -> ``(A list of [r, d_in], B list of
    [d_out, r])``: the LoRA weights per target (see module docstring)."""
    import torch

    class HyperNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.task_encoder = torch.nn.Sequential(
                torch.nn.Linear(2 * hidden, 4 * task_dim),
                torch.nn.GELU(),
                torch.nn.Linear(4 * task_dim, task_dim),
                torch.nn.LayerNorm(task_dim),
            )
            self.basis_a = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(rank, d_in) / d_in**0.5) for _, d_in in shapes]
            )
            self.basis_b = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(d_out, rank) / rank**0.5 * 0.1) for d_out, _ in shapes]
            )
            self.mix = torch.nn.Parameter(torch.zeros(len(shapes), rank * rank, task_dim))
            self.mix_bias = torch.nn.Parameter(torch.zeros(len(shapes), rank * rank))
            self.log_tau = torch.nn.Parameter(torch.tensor(float(np.log(10.0))))
            self.rank = rank

        def task_code(self, features, labels):
            """z float32 [task_dim] from frozen demonstration features [K, hidden] and labels [K]."""
            protos = torch.stack([features[labels == c].mean(0) for c in torch.unique(labels)])
            centre = protos.mean(0)
            return self.task_encoder(torch.cat([centre, (protos - centre).abs().mean(0)]))

        def forward(self, features, labels):
            z = self.task_code(features, labels)
            mixes = (torch.einsum("tkd,d->tk", self.mix, z) + self.mix_bias).view(-1, self.rank, self.rank)
            a = [mixes[t] @ self.basis_a[t] for t in range(len(self.basis_a))]
            return a, list(self.basis_b)

        @property
        def tau(self):
            return self.log_tau.exp()

    return HyperNetwork()


class _GeneratedLoRA:
    """Installs ``y = W x + b + (x Aᵀ) Bᵀ`` on the target Linears, with (A, B) set per task (meta-training)."""

    def __init__(self, base: Any):
        import torch

        self.layers = [m for _, m in target_layers(base)]
        self.weights: list | None = None
        self._handles = []
        for k, m in enumerate(self.layers):

            def hook(module, inputs, output, k=k):
                if self.weights is None:
                    return output
                a, b = self.weights[0][k], self.weights[1][k]
                return output + torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b)

            self._handles.append(m.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def prototype_head(features, labels, n_classes: int, tau):
    """Nearest-prototype classifier as a linear layer: features float32 [K, hidden], labels int64 [K] ->
    ``(weight [n_classes, hidden], bias [n_classes])`` with ``logits = τ (2 P_c·h - |P_c|²)``."""
    import torch

    protos = torch.stack([features[labels == c].mean(0) for c in range(n_classes)])
    return 2 * tau * protos, -tau * (protos * protos).sum(-1)


def _features(wrapper: Any, ids: np.ndarray, mask: np.ndarray, batch: int = 64):
    """Masked-mean features float32 [N, hidden] of the wrapper's encoder (with whatever hooks are installed)."""
    import torch

    from exporters.base import trim_padding

    outs = []
    for i in range(0, len(ids), batch):
        b = trim_padding({"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]})
        outs.append(wrapper.features(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])))
    return torch.cat(outs)


def _frozen_features(wrapper: Any, ids: np.ndarray, mask: np.ndarray):
    import torch

    with torch.no_grad():
        return torch.nn.functional.normalize(_features(wrapper, ids, mask), dim=-1)


@dataclass
class _Task:
    name: str
    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    classes: list[str]


def _load_tasks(data_dir: Path, names: tuple[str, ...], cfg: HyperConfig, tokenizer: Any) -> list[_Task]:
    from edgelm.adapt.tasks import load_task
    from edgelm.compress.train import labels_for
    from edgelm.data import encode

    out = []
    for name in names:
        data = load_task(data_dir, name, limit=cfg.per_task, seed=cfg.seed)
        labels, classes = labels_for(data)
        ids, mask = encode(tokenizer, data)
        out.append(_Task(name, ids, mask, labels, classes))
    return out


def _episode(task: _Task, shots: tuple[int, ...], query: int, max_classes: int, rng: np.random.Generator):
    """Support and query indices and their episode labels 0..C-1 for one episode (K drawn from ``shots``),
    or None if the task has fewer than two classes with K + ``query`` examples."""
    counts = np.bincount(task.labels, minlength=len(task.classes))
    k = int(rng.choice(shots))
    usable = np.flatnonzero(counts >= k + query)
    if len(usable) < 2:
        return None
    classes = rng.choice(usable, size=min(max_classes, len(usable)), replace=False)
    sup, qry, ys, yq = [], [], [], []
    for j, c in enumerate(classes):
        idx = rng.choice(np.flatnonzero(task.labels == c), size=k + query, replace=False)
        sup += list(idx[:k])
        qry += list(idx[k:])
        ys += [j] * k
        yq += [j] * query
    return np.asarray(sup), np.asarray(ys), np.asarray(qry), np.asarray(yq)


def _episode_logits(wrapper: Any, lora: _GeneratedLoRA, hn: Any, task: _Task, episode: tuple):
    """Query logits float32 [Q, C] of one episode under the head built from its support examples through the
    generated LoRA, and the query labels int64 [Q] (gradients flow to ``hn`` unless under no_grad)."""
    import torch

    sup, ys, qry, yq = episode
    ys_t = torch.from_numpy(ys)
    lora.weights = None
    frozen = _frozen_features(wrapper, task.ids[sup], task.mask[sup])
    lora.weights = hn(frozen, ys_t)
    both = np.concatenate([sup, qry])
    feats = _features(wrapper, task.ids[both], task.mask[both])
    w, b = prototype_head(feats[: len(sup)], ys_t, int(ys.max()) + 1, hn.tau)
    return feats[len(sup) :] @ w.T + b, torch.from_numpy(yq)


def _validation(data_dir: Path, cfg: HyperConfig, tokenizer: Any) -> tuple[_Task, list[tuple]] | None:
    """The meta-validation task and its fixed episodes (seeded apart from training), or None without one
    (``cfg.meta_tasks()`` has checked that it is not the held-out task)."""
    if cfg.val_task is None:
        return None
    task = _load_tasks(data_dir, (cfg.val_task,), replace(cfg, per_task=max(cfg.per_task, VAL_EXAMPLES)), tokenizer)[0]
    rng = np.random.default_rng(cfg.seed + 10_000)
    episodes = [_episode(task, (max(cfg.shots),), VAL_QUERY, cfg.max_classes, rng) for _ in range(cfg.val_episodes)]
    if episodes[0] is None:
        raise RecipeError(
            f"the meta-validation task {cfg.val_task} has fewer than two classes with {max(cfg.shots) + VAL_QUERY} "
            "examples: choose another --val-task or raise --per-task"
        )
    return task, episodes


def backbone_wrapper(model: str | os.PathLike | None):
    """The frozen backbone as a mean-pooling classifier wrapper (its head unused) and its LoadedModel."""
    import torch

    from edgelm.compress.train import load_classifier

    torch.manual_seed(0)
    wrapper, _, loaded = load_classifier(model, ["0", "1"], pooling=POOLING)
    wrapper.eval()
    for p in wrapper.parameters():
        p.requires_grad_(False)
    return wrapper, loaded


def meta_train(
    model: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: HyperConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Meta-train a hypernetwork for ``model``'s backbone (``"default"``: MiniLM) on the tasks under
    ``data_dir`` and write it to ``out`` (``hypernet.safetensors`` + ``hypernet.json``, atomically).

    Returns the record written to hypernet.json (config, tasks and their sizes, loss and query accuracy
    (%) over the first and last 10% of episodes, seconds).
    Raises: DataError (missing task files), ModelError, RecipeError (bad settings).
    """
    import torch
    from safetensors.torch import save_file

    from edgelm.compress.train import optimizer_step
    from edgelm.data import load_tokenizer
    from edgelm.fsutil import write_directory

    cfg = cfg or HyperConfig()
    if cfg.episodes < 1 or cfg.rank < 1 or cfg.task_dim < 1 or min(cfg.shots) < 1 or cfg.query < 1:
        raise RecipeError("episodes, rank, task_dim, shots and query must be 1 or more")
    if cfg.val_task is not None and (cfg.val_every < 1 or cfg.val_episodes < 1 or cfg.patience < 0):
        raise RecipeError("val_every and val_episodes must be 1 or more, patience 0 or more")
    names = cfg.meta_tasks()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    wrapper, loaded = backbone_wrapper(model)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, min(cfg.seq_len, loaded.max_positions))
    tasks = _load_tasks(Path(data_dir), names, cfg, tokenizer)
    val = _validation(Path(data_dir), cfg, tokenizer)
    shapes = [tuple(m.weight.shape) for _, m in target_layers(wrapper.base)]
    hidden = int(wrapper.base.config.hidden_size)
    hn = build_hypernetwork(hidden, shapes, cfg.rank, cfg.task_dim)
    lora = _GeneratedLoRA(wrapper.base)
    optimizer = torch.optim.AdamW(hn.parameters(), lr=cfg.lr, weight_decay=0.0)
    losses, accs, curve = [], [], []
    best = {"episode": 0, "accuracy": -1.0, "state": None}
    start = time.perf_counter()

    def validate(episode: int) -> bool:
        """Score the hypernetwork on the validation episodes, keep the best state; True: stop early."""
        if val is None:
            return False
        with torch.no_grad():
            hits = [_episode_logits(wrapper, lora, hn, val[0], ep) for ep in val[1]]
        acc = float(np.mean([(lg.argmax(-1) == y).float().mean() for lg, y in hits]) * 100)
        curve.append({"episode": episode, "accuracy": acc})
        if acc > best["accuracy"]:
            best.update(
                episode=episode, accuracy=acc, state={k: v.detach().clone() for k, v in hn.state_dict().items()}
            )
        stale = sum(1 for c in curve if c["episode"] > best["episode"])
        return cfg.patience > 0 and stale >= cfg.patience

    stopped = None
    try:
        validate(0)  # the untrained hypernetwork generates no update: the demonstrations-only head
        for step in range(cfg.episodes):
            task = tasks[rng.integers(len(tasks))]
            ep = _episode(task, cfg.shots, cfg.query, cfg.max_classes, rng)
            if ep is not None:
                logits, yq_t = _episode_logits(wrapper, lora, hn, task, ep)
                loss = torch.nn.functional.cross_entropy(logits, yq_t)
                losses.append(optimizer_step(loss, optimizer, hn.parameters()))
                accs.append(float((logits.argmax(-1) == yq_t).float().mean()) * 100)
            done = step + 1
            if progress:  # the label changes only with a validation score: one log line per score
                label = "meta-training episodes"
                if curve:
                    label += (
                        f", {cfg.val_task} {curve[-1]['accuracy']:.1f}% at episode {curve[-1]['episode']} "
                        f"(best {best['accuracy']:.1f}%)"
                    )
                progress(label, done, cfg.episodes)
            if (done % cfg.val_every == 0 or done == cfg.episodes) and validate(done):
                stopped = done
                break
    finally:
        lora.remove()
    if best["state"] is not None:
        hn.load_state_dict(best["state"])
    tenth = max(1, len(losses) // 10)
    record = {
        "backbone": "default" if model in (None, "default") else str(loaded.source),
        "hidden_size": hidden,
        "targets": [p for p, _ in target_layers(wrapper.base)],
        "target_shapes": [list(s) for s in shapes],
        "config": asdict(cfg),
        "tasks": {t.name: {"examples": len(t.labels), "classes": t.classes} for t in tasks},
        "episodes_run": len(losses),
        "seconds": time.perf_counter() - start,
        "loss_first": float(np.mean(losses[:tenth])),
        "loss_last": float(np.mean(losses[-tenth:])),
        "query_accuracy_first": float(np.mean(accs[:tenth])),
        "query_accuracy_last": float(np.mean(accs[-tenth:])),
        "validation": None
        if val is None
        else {
            "task": cfg.val_task,
            "episodes": len(val[1]),
            "curve": curve,
            "best_episode": best["episode"],
            "best_accuracy": best["accuracy"],
            "untrained_accuracy": curve[0]["accuracy"],
            "stopped_early_at": stopped,
        },
    }

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in hn.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")

    write_directory(Path(out), fill)
    return record


def load_hypernetwork(directory: str | os.PathLike):
    """``(hypernetwork module in eval mode, record dict)`` from a ``hypernet train`` output directory.
    Raises ModelError when files are missing or do not fit."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelError(
            f"{directory} is not a hypernetwork ({CONFIG_FILE} and {WEIGHTS_FILE} missing): "
            "train one with `edgelm hypernet train --out DIR`"
        )
    try:
        record = json.loads(cfg_path.read_text())
        c = record["config"]
        hn = build_hypernetwork(
            int(record["hidden_size"]), [tuple(s) for s in record["target_shapes"]], int(c["rank"]), int(c["task_dim"])
        )
        hn.load_state_dict(load_file(str(w_path)))
    except Exception as exc:
        raise ModelError(f"the hypernetwork in {directory} is corrupt: {type(exc).__name__}: {exc}") from None
    return hn.eval(), record


def adapt_with_hypernetwork(
    hypernetwork: str | os.PathLike,
    demos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    steps: int = 0,
    lr: float = DEFAULT_STEP_LR,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Write a classifier checkpoint for the task of the labeled demonstrations file ``demos`` to ``out``:
    the hypernetwork's LoRA weights (merged into the backbone; the unmerged peft adapter in ``adapter/``) and
    the prototype head. With ``steps`` = 0 no gradient step is taken and the result is deterministic for
    fixed demonstrations. With ``steps`` = N > 0 the generated LoRA and head are the *initialisation* of N
    AdamW steps of LoRA (r = the hypernetwork's rank, scaling 1) on the same demonstrations (batches of
    ``batch_size``, peak ``lr`` with linear warm-up and decay, ``seed`` for the shuffling): HyperTuning's
    "hypernetwork as initialisation of parameter-efficient fine-tuning" (Phang et al., ICML 2023).

    Returns the record written to ``edgelm_adapt.json`` (classes, demonstrations per class, steps,
    ``generate_seconds`` and ``train_seconds`` of the adaptation itself, ``seconds`` with loading).
    Raises: ModelError (bad hypernetwork or backbone), DataError (no label column, one class, bad file),
    RecipeError (negative steps, lr or batch size out of range).
    """
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise RecipeError("--steps must be 0 or more, --lr above 0 and --batch-size 1 or more")
    import torch

    from edgelm.adapt.peft_methods import AdaptConfig, attach_peft, finish
    from edgelm.compress.train import encode_labeled, labels_for, load_classifier
    from edgelm.data import load_dataset, load_tokenizer

    start = time.perf_counter()
    hn, record = load_hypernetwork(hypernetwork)
    backbone = record["backbone"]
    if backbone != "default" and not Path(backbone).is_dir():
        raise ModelError(f"the hypernetwork's backbone is missing: {backbone}")
    data = load_dataset(demos, text_column=text_column, label_column=label_column)
    names = labels_for(data)[1]
    torch.manual_seed(0)
    cls_wrapper, hf, loaded = load_classifier(backbone, names, pooling=POOLING)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, min(int(record["config"]["seq_len"]), loaded.max_positions))
    (ids, mask, labels), _ = encode_labeled(tokenizer, data, names)
    missing = [n for i, n in enumerate(names) if not (labels == i).any()]
    if missing:
        raise DataError(
            f"{demos} has no demonstration of class(es) {', '.join(missing)}: give each class at least one example"
        )
    shapes = [tuple(m.weight.shape) for _, m in target_layers(cls_wrapper.base)]
    if [list(s) for s in shapes] != record["target_shapes"]:
        raise ModelError("the hypernetwork was trained for another backbone shape")
    rank = int(record["config"]["rank"])
    y = torch.from_numpy(labels)
    cfg = AdaptConfig(method="lora", rank=rank, alpha=float(rank), pooling=POOLING)
    pm = attach_peft(cls_wrapper, hf, cfg)  # peft starts every lora_B at 0: the backbone is still frozen here
    cls_wrapper.eval()
    layers = target_layers(cls_wrapper.base)
    t0 = time.perf_counter()  # the adaptation itself: encode, generate, build the head
    with torch.no_grad():
        a, b = hn(_frozen_features(cls_wrapper, ids, mask), y)
        for k, (_, module) in enumerate(layers):
            module.lora_A["default"].weight.copy_(a[k])
            module.lora_B["default"].weight.copy_(b[k])
        feats = _features(cls_wrapper, ids, mask)
        w, bias = prototype_head(feats, y, len(names), hn.tau)
        head = hf.classifier.modules_to_save["default"]
        head.weight.copy_(w)
        head.bias.copy_(bias)
    generate_seconds = time.perf_counter() - t0
    train_seconds, history = 0.0, []
    if steps:
        from edgelm.compress.train import TrainConfig, fit

        per_epoch = -(-len(ids) // batch_size)
        tc = TrainConfig(
            epochs=-(-steps // per_epoch),
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            seq_len=int(ids.shape[1]),
            weight_decay=0.0,
            max_steps=steps,
        )
        fitted = fit(cls_wrapper, (ids, mask, labels), None, tc, progress=progress)
        train_seconds, history = fitted.seconds, fitted.to_dict()["history"]
    counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    rec = {
        "job": "adapt",
        "method": "hypernetwork",
        "steps": steps,
        "lr": lr if steps else None,
        "base_model": backbone,
        "hypernetwork": str(Path(hypernetwork)),
        "demos": str(demos),
        "labels": names,
        "demonstrations_per_class": counts,
        "rank": rank,
        "tau": float(hn.tau.detach()),
        "generate_seconds": generate_seconds,
        "train_seconds": train_seconds,
        "adapt_seconds": generate_seconds + train_seconds,
        "history": history,  # the steps' training loss per epoch over the demonstrations
        "seconds": time.perf_counter() - start,
    }
    finish(cls_wrapper, hf, pm, cfg, loaded.tokenizer_dir, Path(out), rec)
    return rec
