"""The pipeline: load -> (adapt: a later stage) -> compress (prune, distill) -> export -> validate -> report.

``export_for_device`` is what ``edgelm export`` runs. Every stage takes and returns plain values; the
run writes into a temporary directory beside the output and renames it into place at the end, so a
failed run leaves no half-written ``dist/<device>/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgelm
import exporters
from edgelm import data as data_mod
from edgelm import fsutil, hostinfo, schemes, tasks
from edgelm.bundle import MANIFEST_FILE, SCHEMA, Bundle, Manifest
from edgelm.compress.early_exit import read_exit_config
from edgelm.compress.early_exit import reference_key as early_exit_key
from edgelm.errors import EdgeLMError, ExportError, RecipeError, RuntimeMissingError
from edgelm.fsutil import captured_output
from edgelm.models import LoadedModel, load_model
from edgelm.profiles import load_profile
from edgelm.recipe import FormatPlan, Recipe, make_recipe
from edgelm.report import EARLY_EXIT_LABEL, ArtifactResult, Report
from edgelm.validate.host import HostRunner
from edgelm.validate.metrics import accuracy, fidelity, latency_stats
from exporters.cascade import is_cascade

#: progress callback: (description, steps completed, total steps)
ProgressFn = Callable[[str, int, int], None]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
WARMUP_RUNS = 5
TIMED_RUNS = 20


def reference_outputs(model: LoadedModel, ids: np.ndarray, mask: np.ndarray, batch: int = 32) -> np.ndarray:
    """PyTorch fp32 eager outputs for int64 [N, seq] inputs -> float32 [N, ...]."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            outs.append(
                model.module(torch.from_numpy(ids[i : i + batch]), torch.from_numpy(mask[i : i + batch])).numpy()
            )
    return np.concatenate(outs, axis=0).astype(np.float32)


def eager_latency_ms(
    model: LoadedModel,
    ids: np.ndarray,
    mask: np.ndarray,
    threads: int,
    warmup: int = WARMUP_RUNS,
    runs: int = TIMED_RUNS,
) -> dict[str, float]:
    """p50/p90 latency (ms) of the PyTorch eager fp32 module at ``threads`` threads on one input [1, seq]."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.from_numpy(ids), torch.from_numpy(mask)
        samples = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                t = time.perf_counter()
                model.module(a, b)
                if i >= warmup:
                    samples.append((time.perf_counter() - t) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return latency_stats(samples)


def latency_input(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A full-length timing input [1, seq_len]: the longest golden row, its tokens repeated to fill."""
    row = int(np.argmax(mask.sum(axis=1)))
    tokens = ids[row, : int(mask[row].sum())]
    reps = -(-seq_len // max(len(tokens), 1))
    full = np.tile(tokens, reps)[:seq_len]
    return full[None, :].astype(np.int64), np.ones((1, seq_len), dtype=np.int64)


def check_gates(result: ArtifactResult, plan: FormatPlan, task: tasks.Task, reference: np.ndarray) -> None:
    """Fill ``result.gates`` and ``result.passed`` with :func:`edgelm.tasks.gate_checks` (the same check
    ``edgelm validate`` applies) on the artifact's size and golden outputs against ``reference``."""
    checks = tasks.gate_checks(task, result.fidelity, plan.gates, plan.quant.scheme, reference, result.size_mb)
    result.gates = {k: {"value": c["value"], "limit": c["limit"], "passed": c["passed"]} for k, c in checks.items()}
    result.passed = result.error is None and all(x["passed"] for x in result.gates.values())


def export_artifact(
    model: LoadedModel,
    plan: FormatPlan,
    seq_len: int,
    directory: Path,
    calibration: list[dict[str, np.ndarray]] | None = None,
    adapter_modules: tuple[str, ...] = (),
) -> exporters.Artifact:
    """Export one plan's artifact into ``directory`` (``calibration``: feeds for int8_static;
    ``adapter_modules``: store those modules' weights in a swappable file beside the artifact).
    Raises RuntimeMissingError or ExportError."""
    import torch

    example = {
        "input_ids": torch.ones(1, seq_len, dtype=torch.int64),
        "attention_mask": torch.ones(1, seq_len, dtype=torch.int64),
    }
    try:
        return exporters.get(plan.format).export(
            model.module,
            example,
            plan.quant,
            directory / plan.artifact_name,
            exporters.ExportOptions(
                output_name=model.output_name, calibration=calibration, adapter_modules=adapter_modules
            ),
        )
    except exporters.RuntimeNotInstalledError as exc:
        raise RuntimeMissingError(str(exc)) from None
    except exporters.ExporterError as exc:
        disk = fsutil.user_os_error(exc)  # a full disk is not a converter failure: the CLI says what to do
        if disk is not None:
            raise disk from None
        raise ExportError(f"{plan.format} {plan.quant.scheme}: {exc}") from None


def _copy_tokenizer(model: LoadedModel, directory: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = model.tokenizer_dir / name
        if src.is_file():
            shutil.copy2(src, directory / name)
            copied.append(name)
    return copied


def prepare(device: str, **overrides: Any) -> Recipe:
    """Load the profile, derive the recipe with :func:`edgelm.recipe.make_recipe` and its ``overrides``
    (``formats``, ``quant``, ``seq_len``, ``threads``, ``sparsity``, ``max_accuracy_drop``, ``max_sparsity``:
    the CLI's options), and check that every format's packages are installed. Cheap (no model loading); the
    one place the profile is read. Raises ProfileError, RecipeError or RuntimeMissingError."""
    recipe = make_recipe(load_profile(device), **overrides)
    for plan in recipe.plans:
        try:
            exporters.get(plan.format).check_installed()
        except exporters.RuntimeNotInstalledError as exc:
            raise RuntimeMissingError(f"cannot export {plan.format}: {exc}") from None
    return recipe


@dataclass(frozen=True)
class PipelineOptions:
    """How :func:`export_for_device` runs, beyond the recipe (typed: a misspelt option is a TypeError).

    Attributes:
        text_column / label_column: column names in ``data`` (default: detected).
        limit: use at most this many rows of ``data`` (>= 1).
        train_data: labeled file to distill pruned models on, from the unpruned model, for ``distill_epochs``.
        search: run the accuracy-budget search (:mod:`edgelm.search`) per format instead of the recipe's
            fixed scheme (needs labeled ``data``), for at most ``search_time`` seconds per format.
        lora: ``"merged"`` (the checkpoint as it is) or ``"separate"``: a LoRA-adapted model is exported as a
            base artifact plus its adapter weights in a swappable file beside it (ONNX, ExecuTorch).
        adapters: with ``lora="separate"``, further LoRA-adapted checkpoints of the same base: each gets
            only a weights file for the same base artifact, validated against its own PyTorch model.
        bundle: ``"android"``: also write the demo app's asset folder ``out/<device>/android/edgelm/``.
        ray: with ``search``: try the candidates as Ray tasks (``local``, ``auto`` or ``ray://HOST:PORT``, see
            :func:`edgelm.validate.farm.connect`), as many at once as the cluster has CPUs.
        exit_data: labeled file on which an early-exit checkpoint's thresholds are chosen (default: ``data``).
        command: the command line, recorded in the report.
    """

    text_column: str | None = None
    label_column: str | None = None
    limit: int | None = None
    train_data: str | None = None
    distill_epochs: int = 1
    search: bool = False
    search_time: float = 900.0
    lora: str = "merged"
    adapters: tuple[str, ...] = ()
    bundle: str | None = None
    ray: str | None = None
    exit_data: str | None = None
    command: str = ""


def export_for_device(
    recipe: Recipe,
    model: str | None = None,
    data: str | None = None,
    out: str | Path = "dist",
    options: PipelineOptions | None = None,
    *,
    progress: ProgressFn | None = None,
) -> Report:
    """Export ``model`` for the recipe's device in every format of the recipe, check each artifact on this
    host through the same path as ``edgelm validate --runner host`` (:func:`edgelm.validate.bundle.run_bundle`
    and :func:`~edgelm.validate.bundle.evaluate`), and write ``out/<device>/``: artifacts, tokenizer,
    manifest.json, golden.npz, validation.json, report.json/md, logs/.

    Stages, each returning plain values: load -> reference -> compress and export -> write -> check ->
    report. Everything is written into a temp folder beside the output and renamed into place at the end.

    Args:
        recipe: from :func:`prepare` (or :func:`edgelm.recipe.make_recipe`).
        model: None/"default" (packaged all-MiniLM-L6-v2) or a Hugging Face checkpoint directory.
        data: TSV/CSV/JSONL eval file (text column, optional label column); default: the built-in probes.
        out: the output root; the bundle goes to ``out/<device>/``.
        options: :class:`PipelineOptions`.
        progress: called with (description, done, total) as stages complete.
    Returns:
        The :class:`Report`; ``report.passed`` is False if any artifact missed a gate.
    Raises:
        EdgeLMError subclasses for bad input (nothing is written). A missed gate is not an exception:
        it is ``report.passed == False`` with the bundle written, and the CLI exits 1.
    """
    start = time.perf_counter()
    opts = options or PipelineOptions()
    from edgelm.appbundle import BUNDLE_KINDS

    if opts.bundle is not None and opts.bundle not in BUNDLE_KINDS:
        raise RecipeError(f"unknown --bundle {opts.bundle!r}: use {', '.join(BUNDLE_KINDS)}")
    data_mod.check_limit(opts.limit)
    total = 5 + len(recipe.plans) + len(opts.adapters)  # load, reference, exports, adapters, write, check, report
    with contextlib.suppress(EdgeLMError):  # an early-exit checkpoint exports a cascade per plan too
        total += len(recipe.plans) if model and read_exit_config(model) else 0
    done = 0

    def step(desc: str) -> None:
        nonlocal done, total
        total = max(total, done + 1)  # the search adds steps as it tries candidates
        if progress:
            progress(desc, done, total)
        done += 1

    out = Path(out)
    created_out = not out.exists()
    final = out / recipe.device
    reports: list[Report] = []

    def fill(tmp: Path) -> None:
        (tmp / "logs").mkdir()
        with captured_output(tmp / "logs" / "export.log"):
            reports.append(_export_into(tmp, final, recipe, model, data, opts, step, start))
            if opts.bundle == "android":
                from edgelm.appbundle import write_android_bundle

                write_android_bundle(tmp)

    try:  # a temp folder beside the output, renamed into place at the end (leftovers of killed runs removed)
        fsutil.write_directory(final, fill)
    except BaseException:
        if created_out:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        raise
    report = reports[0]
    if progress:
        progress("done", done, done)
    return report


CALIBRATION_ROWS = 64


def calibration_rows(ids: np.ndarray, mask: np.ndarray, n: int = CALIBRATION_ROWS) -> list[dict[str, np.ndarray]]:
    """Up to ``n`` evenly spaced inputs, each [1, its own length] int64, for static-quantization calibration."""
    idx = np.unique(np.linspace(0, len(ids) - 1, num=min(n, len(ids))).astype(int))
    rows = []
    for i in idx:
        length = max(2, int(mask[i].sum()))
        rows.append({"input_ids": ids[i : i + 1, :length], "attention_mask": mask[i : i + 1, :length]})
    return rows


class _Variants:
    """The model at each sparsity, built on demand and cached: 0 is the loaded model; others are one-shot
    magnitude-pruned copies, distilled from the unpruned model when training data is given."""

    def __init__(
        self,
        loaded: LoadedModel,
        ids: np.ndarray,
        mask: np.ndarray,
        train: tuple | None,
        distill_epochs: int,
        seq_len: int,
    ):
        self.loaded, self.ids, self.mask, self.train = loaded, ids, mask, train
        self.distill_epochs, self.seq_len = distill_epochs, seq_len
        self._cache: dict[float, tuple[LoadedModel, np.ndarray, dict | None]] = {}
        self._structure: dict[float, LoadedModel] = {}

    def structure(self, sparsity: float) -> LoadedModel:
        """A pruned copy for the cost model only (no training)."""
        if sparsity == 0 or sparsity in self._cache:
            return self.get(sparsity)[0]
        if sparsity not in self._structure:
            self._structure[sparsity] = self._pruned(sparsity)[0]
        return self._structure[sparsity]

    def _pruned(self, sparsity: float, distill: bool = False) -> tuple[LoadedModel, dict]:
        """A copy pruned one-shot by magnitude (:func:`edgelm.compress.jobs.prune_and_distill`), distilled
        from the unpruned model when ``distill`` and training data are given."""
        import copy

        from edgelm.compress import pruning
        from edgelm.compress.jobs import DISTILL_LR, prune_and_distill
        from edgelm.compress.train import TrainConfig, teacher_copy

        m = copy.deepcopy(self.loaded)
        before = pruning.encoder_parameter_count(m.module)
        epochs = self.distill_epochs if distill and self.train is not None else 0
        cfg = TrainConfig(epochs=epochs, lr=DISTILL_LR, seq_len=self.seq_len)
        res = prune_and_distill(
            m.module, sparsity, self.train, cfg, teacher=teacher_copy(self.loaded.module) if epochs else None
        )
        info = {
            "method": "magnitude (one-shot)",
            "sparsity": sparsity,
            "encoder_parameters_before": before,
            "encoder_parameters_after": pruning.encoder_parameter_count(m.module),
            "record": res.pruning,
        }
        if epochs:
            info.update(distill_epochs=epochs, distill_seconds=res.seconds)
        return m, info

    def get(self, sparsity: float) -> tuple[LoadedModel, np.ndarray, dict | None]:
        """``(model, its reference outputs on the golden inputs, compression info or None)``."""
        if sparsity not in self._cache:
            if sparsity == 0:
                self._cache[0.0] = (self.loaded, reference_outputs(self.loaded, self.ids, self.mask), None)
            else:
                m, info = self._pruned(sparsity, distill=True)
                self._cache[sparsity] = (m, reference_outputs(m, self.ids, self.mask), info)
        return self._cache[sparsity]


@dataclass
class Reference:
    """The reference stage's result: the golden inputs, labels and PyTorch fp32 outputs, the timing input,
    PyTorch eager latency, and the model at each sparsity (:class:`_Variants`)."""

    dataset: Any
    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray | None
    baseline: float | None
    golden: dict
    eager: dict
    host_threads: int
    calibration: list
    variants: _Variants
    warnings: list[str]


def load_stage(recipe: Recipe, model: str | None, opts: PipelineOptions) -> tuple[LoadedModel, tuple[str, ...]]:
    """Load the model (LoRA kept unmerged for ``--lora separate``) and refuse what the recipe cannot do with
    it before the long work. Returns ``(model, adapter module pieces or ())``."""
    adapter_modules = _check_lora(opts.lora, list(opts.adapters), recipe, opts.search)
    if adapter_modules:
        from edgelm.adapt.peft_methods import load_unmerged

        loaded = load_unmerged(model)
    else:
        loaded = load_model(model)
    if opts.bundle == "android":  # refuse a tokenizer the app cannot run before the long work
        from edgelm.appbundle import wordpiece_settings

        wordpiece_settings(loaded.tokenizer_dir, recipe.seq_len)
    if recipe.seq_len > loaded.max_positions:
        raise RecipeError(f"--seq-len {recipe.seq_len} exceeds the model's {loaded.max_positions} positions")
    if (recipe.sparsity > 0 or opts.search) and not loaded.task.prunable:
        raise RecipeError(
            "pruning and the accuracy-budget search need a fine-tuned classifier (--model from "
            "`edgelm finetune`); an embedding model has no task accuracy to guard"
        )
    return loaded, adapter_modules


def reference_stage(recipe: Recipe, loaded: LoadedModel, data: str | None, opts: PipelineOptions) -> Reference:
    """Read and tokenize the data, compute the PyTorch fp32 reference outputs and eager latency."""
    dataset = (
        data_mod.load_dataset(data, opts.text_column, opts.label_column, opts.limit)
        if data
        else data_mod.probe_dataset()
    )
    labels, warnings = None, []
    if dataset.labels is not None and loaded.task.uses_labels:
        labels = data_mod.label_indices(dataset.labels, loaded.labels)
    elif dataset.labels is not None:
        warnings.append(data_mod.ignored_labels_warning(dataset, loaded.kind))
    if opts.search and labels is None:
        raise RecipeError("--search measures task accuracy: pass --data with a label column")
    tokenizer = data_mod.load_tokenizer(loaded.tokenizer_dir, recipe.seq_len)
    ids, mask = data_mod.encode(tokenizer, dataset)
    train = None
    if opts.train_data:
        from edgelm.compress.train import encode_labeled

        train_set = data_mod.load_dataset(opts.train_data, opts.text_column, opts.label_column)
        train = encode_labeled(tokenizer, train_set, loaded.labels)[0]
    variants = _Variants(loaded, ids, mask, train, opts.distill_epochs, recipe.seq_len)
    ref = variants.get(0.0)[1]
    lat_ids, lat_mask = latency_input(ids, mask, recipe.seq_len)
    host_threads = min(recipe.threads, os.cpu_count() or 1)
    golden = {
        "input_ids": ids,
        "attention_mask": mask,
        "reference": ref,
        "latency_input_ids": lat_ids,
        "latency_attention_mask": lat_mask,
    }
    extra = {"texts": np.asarray(dataset.texts), "labels": labels}  # what the task's golden set keeps
    golden.update({k: extra[k] for k in loaded.task.golden_keys if extra.get(k) is not None})
    return Reference(
        dataset=dataset,
        ids=ids,
        mask=mask,
        labels=labels,
        baseline=accuracy(ref, labels) if labels is not None else None,
        golden=golden,
        eager=eager_latency_ms(loaded, lat_ids, lat_mask, host_threads),
        host_threads=host_threads,
        calibration=calibration_rows(ids, mask),
        variants=variants,
        warnings=warnings,
    )


def _reference_key(sparsity: float) -> str:
    return "reference" if sparsity == 0 else f"reference_sparsity_{round(sparsity * 100)}"


@dataclass
class Exported:
    """The compress/export stage's result: per artifact its plan (the searched one with ``--search``), file,
    sparsity and cost-model estimate, plus the search summaries and the swapped adapters' rows."""

    recipe: Recipe
    artifacts: list[exporters.Artifact]
    sparsities: list[float]
    estimates: list[dict]
    searches: list[dict]
    adapters: list[dict]
    extra_plans: list[FormatPlan] = dataclasses.field(default_factory=list)

    @property
    def plans(self) -> list[FormatPlan]:
        """The plan of each artifact, in order: the recipe's, then those of extra artifacts (an early-exit
        checkpoint's cascades share their whole model's plan)."""
        return [*self.recipe.plans, *self.extra_plans]


class _Stage:
    """What the compress/export stage and the search share: the recipe, the reference, the temp folder and
    the host runner. ``cost`` prices a model under a scheme, ``export_plan`` writes one artifact, ``measure``
    exports and judges one search candidate."""

    def __init__(self, recipe: Recipe, loaded: LoadedModel, ref: Reference, tmp: Path, adapter_modules, step):
        self.recipe, self.loaded, self.ref, self.tmp = recipe, loaded, ref, tmp
        self.adapter_modules, self.step = adapter_modules, step
        self.runner = HostRunner()

    def cost(self, model: LoadedModel, fmt: str, quant: exporters.QuantSpec) -> dict:
        from edgelm.compress.estimate import estimate

        return estimate(
            model.module,
            self.recipe,
            scheme=quant.scheme,
            fmt=fmt,
            embedding_bits=quant.embedding_bits,
            group_size=quant.group_size,
        ).to_dict()

    def export_plan(self, plan: FormatPlan, sparsity: float, directory: Path) -> exporters.Artifact:
        model = self.ref.variants.get(sparsity)[0]
        self.step(f"exporting {plan.format} {plan.quant.label}" + (f" ({sparsity:.0%} pruned)" if sparsity else ""))
        with captured_output(self.tmp / "logs" / f"export-{plan.format}-{plan.quant.scheme}.log"):
            calibration = self.ref.calibration if schemes.get(plan.quant.scheme).needs_calibration else None
            return export_artifact(model, plan, self.recipe.seq_len, directory, calibration, self.adapter_modules)

    def measure(self, plan: FormatPlan, sparsity: float, directory: Path) -> tuple[exporters.Artifact, ArtifactResult]:
        """Export and run one search candidate, judged by the same gate check as the final artifacts."""
        ref = self.ref
        art = self.export_plan(plan, sparsity, directory)
        estimate = self.cost(ref.variants.structure(sparsity), plan.format, plan.quant)
        res = _judge_candidate(
            plan, art, sparsity, self.loaded.num_parameters * 4, self.loaded.kind, estimate, self.tmp / "golden.npz",
            ref.variants.get(sparsity)[1], ref.labels, ref.baseline, ref.host_threads, self.runner,
        )  # fmt: skip
        return art, res


def export_stage(stage: _Stage, opts: PipelineOptions) -> Exported:
    """Compress (prune, distill) and export every plan of the recipe into the temp folder, or search each
    format's scheme and sparsity with ``--search``; then the swapped adapters' weights files."""
    recipe = stage.recipe
    plans, artifacts, sparsities, searches = [], [], [], []
    with contextlib.ExitStack() as stack:
        remote = stack.enter_context(_RaySearch.connected(stage, opts.ray)) if opts.search and opts.ray else None
        for plan in recipe.plans:
            art, sparsity = _plan_or_search(stage, plan, opts, remote, searches)
            if opts.search:
                plan = dataclasses.replace(plan, quant=art.quant, gates=recipe.gates_for(art.quant.scheme))
            plans.append(plan)
            artifacts.append(art)
            sparsities.append(sparsity)
    return _finish_export_stage(stage, opts, plans, artifacts, sparsities, searches)


def _plan_or_search(stage: _Stage, plan: FormatPlan, opts: PipelineOptions, remote, searches: list) -> tuple:
    """One format: its searched artifact (the summary appended to ``searches``) or the recipe's plan exported.
    Returns ``(artifact, sparsity)``."""
    recipe, ref = stage.recipe, stage.ref
    if opts.search:
        art, res, summary = _search_format(
            plan, recipe, ref.variants, stage.measure, stage.cost, stage.tmp, opts.search_time, remote
        )
        searches.append(summary)
        return art, res.sparsity
    return stage.export_plan(plan, recipe.sparsity, stage.tmp), recipe.sparsity


def _finish_export_stage(stage: _Stage, opts: PipelineOptions, plans, artifacts, sparsities, searches) -> Exported:
    recipe, ref = stage.recipe, stage.ref
    final = dataclasses.replace(recipe, plans=plans)
    adapters = []
    for adapter_dir in opts.adapters:
        stage.step(f"adapter {Path(adapter_dir).name}")
        adapters += _extra_adapter(
            adapter_dir,
            stage.loaded,
            artifacts,
            final,
            stage.tmp,
            ref.golden,
            ref.ids,
            ref.mask,
            ref.labels,
            stage.runner,
            ref.host_threads,
            ref.calibration,
        )
    estimates = [stage.cost(ref.variants.get(s)[0], p.format, p.quant) for p, s in zip(plans, sparsities, strict=True)]
    return Exported(final, artifacts, sparsities, estimates, searches, adapters)


def write_stage(
    tmp: Path, loaded: LoadedModel, ref: Reference, ex: Exported, opts: PipelineOptions
) -> tuple[Manifest, dict | None]:
    """Write the golden set (with every reference), tokenizer, labels and the typed manifest into ``tmp``.
    Returns ``(manifest, compression info or None)``."""
    compression = None
    for s in sorted(set(ex.sparsities)):
        if s > 0:
            info = dict(ref.variants.get(s)[2])
            info.pop("record", None)
            info["train"] = opts.train_data
            ref.golden[_reference_key(s)] = ref.variants.get(s)[1]
            compression = info
    np.savez(tmp / "golden.npz", **ref.golden)
    tok_files = _copy_tokenizer(loaded, tmp)
    if loaded.labels:
        (tmp / "labels.json").write_text(json.dumps(loaded.labels, indent=2) + "\n")
    manifest = _manifest(
        ex.recipe,
        loaded,
        ref,
        tmp,
        ex.artifacts,
        ex.sparsities,
        ex.estimates,
        tok_files,
        compression,
        ex.adapters,
        _versions(),
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest, compression


def check_stage(
    tmp: Path, final: Path, loaded: LoadedModel, ref: Reference, ex: Exported
) -> tuple[Bundle, dict, list[ArtifactResult]]:
    """Run and evaluate the written bundle exactly as ``edgelm validate --runner host`` does (sha256 before
    loading, golden outputs, accuracy, latency) and turn each artifact's record into its report row, judged
    by the task's gates (:func:`check_gates`). Returns ``(bundle, the host record, results)``."""
    from edgelm.validate.bundle import evaluate, run_bundle

    bundle = Bundle.load(tmp)
    bundle.location = final
    runner = HostRunner()
    record = evaluate(bundle, run_bundle(bundle, runner, threads=ref.host_threads, warmup=WARMUP_RUNS, runs=TIMED_RUNS))
    results = []
    for plan, art, s, est in zip(ex.plans, ex.artifacts, ex.sparsities, ex.estimates, strict=True):
        res = _result(plan, art, s, loaded.num_parameters * 4, ref.host_threads, est)
        rec = record["artifacts"][art.path.name]
        res.error = rec.get("error")
        res.fidelity = rec.get("fidelity") or {"cosine_mean": float("nan")}
        lat = rec.get("latency") or {}
        if lat.get("p50_ms"):
            res.latency = {k: lat[k] for k in ("p50_ms", "p90_ms", "mean_ms", "min_ms") if k in lat}
            res.speedup_vs_eager = ref.eager["p50_ms"] / res.latency["p50_ms"]
        res.peak_rss_mb, res.load_ms = rec.get("peak_rss_mb"), rec.get("load_ms")
        res.sentence_latency = rec.get("sentence_latency")
        cascade = is_cascade(art.path)
        if cascade:  # judged by top-1 agreement with the PyTorch cascade and accuracy, not logits' error
            res.quant += EARLY_EXIT_LABEL
            res.exits = {**(rec.get("exits") or {}), "policy": art.details["early_exit"]}
        check_gates(res, plan, loaded.task, None if cascade else bundle.reference(art.path.name))
        res.passed = res.passed and rec["status"] == "passed"
        if rec["status"] != "passed" and res.error is None:
            res.error = "; ".join(f"{k}: {c['detail']}" for k, c in rec["checks"].items() if not c["passed"])
        results.append(res)
    return bundle, record, results


def report_stage(
    final: Path,
    loaded: LoadedModel,
    ref: Reference,
    ex: Exported,
    results: list[ArtifactResult],
    compression: dict | None,
    opts: PipelineOptions,
    start: float,
) -> Report:
    """The export's :class:`Report` (data, reference, per-artifact results, search, adapters)."""
    search_info = None
    if ex.searches:
        search_info = {
            **{k: v for k, v in ex.searches[0].items() if k not in ("candidates", "format", "seconds")},
            "seconds": sum(x["seconds"] for x in ex.searches),
            "time_limit_reached": any(x["time_limit_reached"] for x in ex.searches),
            "candidates": [c for x in ex.searches for c in x["candidates"]],
        }
    return Report(
        device=ex.recipe.device,
        model=loaded.describe(),
        data={
            "source": ref.dataset.source,
            "count": len(ref.dataset),
            "labeled": ref.labels is not None,
            "command": opts.command,
            "warnings": ref.warnings,
        },
        recipe=ex.recipe.to_dict(),
        reference={
            "eager_p50_ms": ref.eager["p50_ms"],
            "eager_p90_ms": ref.eager["p90_ms"],
            "threads": ref.host_threads,
            "accuracy": ref.baseline,
            "host": hostinfo.cpu_info(),
        },
        artifacts=results,
        output_dir=str(final),
        wall_seconds=time.perf_counter() - start,
        versions=_versions(),
        compression=compression,
        search=search_info,
        adapters=ex.adapters,
    )


def _versions() -> dict[str, str]:
    return exporters.base.package_versions(
        "edgelm",
        "torch",
        "transformers",
        "executorch",
        "torchao",
        "onnx",
        "onnxruntime",
        "litert-torch",
        "ai-edge-litert",
        "numpy",
    )


def _export_into(
    tmp: Path,
    final: Path,
    recipe: Recipe,
    model: str | None,
    data: str | None,
    opts: PipelineOptions,
    step: Callable[[str], None],
    start: float,
) -> Report:
    """The stages of :func:`export_for_device`, each returning plain values; everything goes into ``tmp``."""
    from edgelm.validate.bundle import write_validation

    step("loading model")
    loaded, adapter_modules = load_stage(recipe, model, opts)
    exits = read_exit_config(loaded.source)
    if exits is not None:
        _check_early_exit(recipe, opts, adapter_modules, data)
    elif opts.exit_data:
        raise RecipeError("--exit-data chooses an early-exit checkpoint's threshold; this model has no exits")
    step("reading data, PyTorch fp32 reference")
    ref = reference_stage(recipe, loaded, data, opts)
    np.savez(tmp / "golden.npz", **ref.golden)  # the search and swapped adapters run on it; rewritten below
    exported = export_stage(_Stage(recipe, loaded, ref, tmp, adapter_modules, step), opts)
    if exits is not None:
        early_exit_stage(tmp, loaded, ref, exported, opts, step)
    step("writing the bundle")
    _, compression = write_stage(tmp, loaded, ref, exported, opts)
    step("checking every artifact on this host")
    bundle, record, results = check_stage(tmp, final, loaded, ref, exported)
    step("writing the report")
    report = report_stage(final, loaded, ref, exported, results, compression, opts, start)
    report.write(tmp)
    write_validation(bundle, record)  # validation.json and the validation sections of report.md
    return report


def _check_early_exit(recipe: Recipe, opts: PipelineOptions, adapter_modules, data: str | None) -> None:
    """Refuse what an early-exit checkpoint cannot be exported with, before the long work."""
    if recipe.sparsity > 0 or opts.search or adapter_modules:
        raise RecipeError(
            "an early-exit checkpoint exports as it was trained: pruning, --search and --lora separate would "
            "change the layers its exits read; prune first, then add exits (`edgelm compress --method early-exit`)"
        )
    if not (opts.exit_data or data):
        raise RecipeError(
            "an early-exit checkpoint needs labeled --data (or --exit-data) to choose its exit threshold "
            "within the profile's accuracy budget"
        )


def early_exit_stage(
    tmp: Path, loaded: LoadedModel, ref: Reference, ex: Exported, opts: PipelineOptions, step: Callable
) -> None:
    """An early-exit checkpoint's cascades: for each plan, the model split at its exits into segment
    artifacts of the plan's format and scheme, the threshold chosen on the labeled exit data from the
    artifact's own exits (:func:`edgelm.compress.early_exit.export_cascades`); appended to ``ex`` beside the
    whole models, their PyTorch cascade references added to the golden set. Raises RecipeError without labels."""
    from edgelm.compress.early_exit import export_cascades, load_early_exit

    if opts.exit_data:
        ds = data_mod.load_dataset(opts.exit_data, opts.text_column, opts.label_column)
        ids, mask = data_mod.encode(data_mod.load_tokenizer(loaded.tokenizer_dir, ex.recipe.seq_len), ds)
        labels = data_mod.label_indices(ds.labels, loaded.labels) if ds.labels is not None else None
        source = ds.source
    else:
        ids, mask, labels, source = ref.ids, ref.mask, ref.labels, ref.dataset.source
    if labels is None:
        raise RecipeError(f"{source} has no labels: the exit threshold is chosen on labeled data (--exit-data)")
    model, cfg = load_early_exit(loaded.source, loaded)
    plans = list(ex.recipe.plans)
    try:
        with captured_output(tmp / "logs" / "export-early-exit.log"):
            done = export_cascades(
                model, plans, ex.recipe.seq_len, tmp, (ids, mask, labels), (ref.ids, ref.mask),
                measure=cfg.get("confidence", "max_prob"), threads=ref.host_threads, source=str(source), step=step,
            )  # fmt: skip
    except exporters.RuntimeNotInstalledError as exc:
        raise RuntimeMissingError(str(exc)) from None
    except exporters.ExporterError as exc:
        raise ExportError(f"early-exit cascade: {exc}") from None
    for plan, cascade, est in zip(plans, done, list(ex.estimates), strict=True):
        ex.extra_plans.append(plan)
        ex.artifacts.append(cascade.artifact)
        ex.sparsities.append(0.0)
        ex.estimates.append({**est, "note": "the whole model's estimate (no exit taken)"})
        ref.golden[early_exit_key(cascade.artifact.path.name)] = cascade.reference


def _judge_candidate(
    plan: FormatPlan,
    art: exporters.Artifact,
    sparsity: float,
    fp32_bytes: int,
    kind: str,
    estimate: dict,
    golden: Path,
    reference: np.ndarray,
    labels,
    baseline,
    threads: int,
    runner: HostRunner,
) -> ArtifactResult:
    """A search candidate's exported artifact run on the golden set (``runner``, ``threads``, 1 warm-up and 3
    timed runs) and judged by the same gate check as the final artifacts against ``reference``; a runtime
    failure is the result's ``error``."""
    res = _result(plan, art, sparsity, fp32_bytes, threads, estimate)
    try:
        run = runner.run_artifact(art.path, golden, threads=threads, warmup=1, runs=3)
        res.fidelity = fidelity(run.outputs, reference, kind, labels, baseline_accuracy=baseline)
    except EdgeLMError as exc:
        res.error, res.fidelity = str(exc), {"cosine_mean": float("nan")}
    check_gates(res, plan, tasks.for_kind(kind), reference)
    return res


def _result(
    plan: FormatPlan, art: exporters.Artifact, sparsity: float, fp32_bytes: int, threads: int, estimate: dict
) -> ArtifactResult:
    return ArtifactResult(
        file=art.path.name,
        format=plan.format,
        quant=plan.quant.label,
        delegate=plan.delegate,
        size_mb=art.size_bytes / 1e6,
        size_vs_fp32=art.size_bytes / fp32_bytes,
        export_seconds=art.export_seconds,
        threads=threads,
        sparsity=sparsity,
        estimate=estimate,
    )


def _manifest(recipe, loaded, ref, tmp, artifacts, sparsities, estimates, tok_files, compression, adapters, versions):
    """The typed :class:`~edgelm.bundle.Manifest` of the bundle in ``tmp``."""
    artifact_dicts = []
    for a, s_, est in zip(artifacts, sparsities, estimates, strict=True):
        d = a.to_dict()
        key = early_exit_key(a.path.name) if is_cascade(a.path) else _reference_key(s_)
        d.update(sparsity=s_, golden_reference=key, estimate=est)
        artifact_dicts.append(d)
    return Manifest.model_validate(
        {
            "schema": SCHEMA,
            "edgelm_version": edgelm.__version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": recipe.profile,
            "recipe": recipe.to_dict(),
            "model": loaded.describe(),
            "tokenizer": {
                "files": tok_files,
                "max_length": recipe.seq_len,
                "padding": "right",
                "pad_to": "seq_len (ONNX/ExecuTorch accept any length 2..seq_len; TFLite pads to a bucket)",
            },
            "labels": loaded.labels,
            "golden": {
                "file": "golden.npz",
                "sha256": exporters.sha256_file(tmp / "golden.npz"),
                "count": len(ref.dataset),
                "source": ref.dataset.source,
                "output": loaded.output_name,
            },
            "compression": compression,
            "artifacts": artifact_dicts,
            "adapters": adapters,
            "versions": versions,
        }
    )


LORA_MODES = ("merged", "separate")


def _check_lora(lora: str, adapters: list[str], recipe: Recipe, search: bool) -> tuple[str, ...]:
    """Validate the LoRA export options; returns the adapter module pieces for ``"separate"`` (else ())."""
    if lora not in LORA_MODES:
        raise RecipeError(f"unknown --lora {lora!r}: use {' or '.join(LORA_MODES)}")
    if lora == "merged":
        if adapters:
            raise RecipeError("--adapter needs --lora separate (one base artifact, one weights file per adapter)")
        return ()
    if recipe.sparsity > 0 or search:
        raise RecipeError(
            "--lora separate exports the adapters' shared base as it is: it cannot be combined with pruning or --search"
        )
    static = [p for p in recipe.plans if not schemes.get(p.quant.scheme).adapters_share_base]
    if static:
        raise RecipeError(
            f"--lora separate with {', '.join(f'{p.format} {p.quant.scheme}' for p in static)}: calibrated activation scales "
            "depend on the adapter, so adapters could not share one base; use int8_dynamic or 8da4w"
        )
    refused = [p.format for p in recipe.plans if exporters.get(p.format).separate_adapters]
    if refused:
        able = [f for f in exporters.formats() if not exporters.get(f).separate_adapters]
        raise RecipeError(
            f"{exporters.get(refused[0]).separate_adapters}. Pass --format {','.join(able)} with --lora separate"
        )
    return exporters.base.ADAPTER_MODULES


def _extra_adapter(
    adapter_dir: str,
    loaded: LoadedModel,
    artifacts: list,
    recipe: Recipe,
    tmp: Path,
    golden: dict,
    ids: np.ndarray,
    mask: np.ndarray,
    labels,
    runner,
    threads: int,
    calibration,
) -> list[dict]:
    """Export ``adapter_dir`` (another LoRA adapter of the same base) for every artifact, check that its base
    file is byte-identical to the one written, keep only its weights file (``<stem>.<name>.adapter<ext>``)
    and validate the base artifact with it against the adapter's PyTorch model (``golden`` gains the adapter's
    reference outputs; the caller writes golden.npz). Returns one row per artifact.
    Raises ExportError when the adapter does not share the base."""
    from edgelm.adapt.peft_methods import load_unmerged

    other = load_unmerged(adapter_dir)
    name = Path(adapter_dir).resolve().name
    key = f"reference_adapter_{name}"
    golden[key] = reference_outputs(other, ids, mask)
    rows = []
    for art in artifacts:
        plan = next(p for p in recipe.plans if p.artifact_name == art.path.name)
        with tempfile.TemporaryDirectory(dir=tmp) as work:
            with captured_output(tmp / "logs" / f"export-{plan.format}-adapter-{name}.log"):
                other_art = export_artifact(
                    other, plan, recipe.seq_len, Path(work), calibration, exporters.base.ADAPTER_MODULES
                )
            if other_art.sha256() != art.sha256():
                raise ExportError(
                    f"adapter {adapter_dir} does not share the base of {loaded.source}: its "
                    f"{plan.format} base artifact differs (adapt both from the same base model)"
                )
            src = other_art.companions[0]
            dest = tmp / src.name.replace(".adapter", f".{name}.adapter")
            shutil.copy2(src, dest)
        run = runner.run_artifact(art.path, tmp / "golden.npz", threads=threads, warmup=1, runs=3, adapter=dest)
        fid = fidelity(run.outputs, golden[key], loaded.kind, labels)
        rows.append(
            {
                "adapter": str(adapter_dir),
                "name": name,
                "artifact": art.path.name,
                "file": dest.name,
                "sha256": exporters.sha256_file(dest),
                "size_bytes": dest.stat().st_size,
                "golden_reference": key,
                "fidelity": fid,
            }
        )
    return rows


def _search_format(
    plan: FormatPlan,
    recipe: Recipe,
    variants: _Variants,
    measure,
    cost,
    tmp: Path,
    search_time: float,
    remote: _RaySearch | None = None,
):
    """Run the accuracy-budget search for one format; the chosen artifact is moved into ``tmp``. ``remote``:
    try the candidates as Ray tasks, as many at once as the cluster has CPUs (the same choice).
    Returns ``(artifact, its measured result, the search summary)``."""
    from edgelm.search import candidates, run_search

    work = tmp / "search"
    work.mkdir(exist_ok=True)

    def cplan(c) -> FormatPlan:
        return FormatPlan(plan.format, c.quant, plan.delegate, recipe.gates_for(c.quant.scheme))

    def evaluate(c) -> None:
        directory = work / f"{plan.format}-{len(list(work.iterdir()))}"
        directory.mkdir()
        try:
            art, res = measure(cplan(c), c.sparsity, directory)
        except EdgeLMError as exc:  # a converter failure rejects the candidate, it does not end the search
            _reject(c, cplan(c), exc)
            return
        _measured(c, art, res)

    cands = candidates(plan.format, exporters.get(plan.format).schemes, recipe.max_sparsity, recipe.sparsities)
    chosen, summary = run_search(
        cands,
        estimate=lambda c: cost(variants.structure(c.sparsity), plan.format, c.quant),
        evaluate=evaluate,
        max_accuracy_drop=plan.gates.max_accuracy_drop,
        max_size_mb=recipe.max_artifact_mb,
        target_latency_ms=recipe.target_latency_ms,
        max_peak_ram_mb=recipe.max_peak_ram_mb,
        time_limit_s=search_time,
        evaluate_batch=None if remote is None else lambda wave: remote.evaluate(wave, cplan, work),
        batch=1 if remote is None else remote.batch,
    )
    target = tmp / cplan(chosen).artifact_name
    os.replace(chosen.artifact.path, target)
    chosen.artifact.path = target
    chosen.result.file = target.name
    shutil.rmtree(work, ignore_errors=True)
    return chosen.artifact, chosen.result, summary


#: Test hook: a path; the first search candidate run as a Ray task creates it and kills its worker process, so
#: that the tests can check Ray's retry of a lost task (``EDGELM_FAULT_KILL_ONCE=/tmp/marker``).
FAULT_KILL_ONCE = "EDGELM_FAULT_KILL_ONCE"


def _measure_on_worker(
    model: LoadedModel,
    plan: FormatPlan,
    sparsity: float,
    seq_len: int,
    calibration,
    adapter_modules: tuple[str, ...],
    golden: dict[str, np.ndarray],
    reference: np.ndarray,
    labels,
    baseline,
    estimate: dict,
    fp32_bytes: int,
) -> tuple[exporters.Artifact, ArtifactResult, dict[str, bytes], dict]:
    """One search candidate in a Ray task: export it into a temp folder on the worker, run it there on the
    golden set (the host runner, 1 thread: the task's CPU), judge it with the same gate check. Returns the
    artifact, its result, its files' bytes (the driver writes them into its own folder: nodes share no disk)
    and where it ran (``{"node", "pid", "seconds"}``: the task's wall time). Raises EdgeLMError (export failed)."""
    import socket

    t0 = time.perf_counter()
    marker = os.environ.get(FAULT_KILL_ONCE)
    if marker and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # a lost worker: Ray retries the task
    with tempfile.TemporaryDirectory(prefix="edgelm-candidate-") as d:
        d = Path(d)
        np.savez(d / "golden.npz", **golden)
        with captured_output(d / "export.log"):
            art = export_artifact(model, plan, seq_len, d, calibration, adapter_modules)
        res = _judge_candidate(
            plan, art, sparsity, fp32_bytes, model.kind, estimate, d / "golden.npz", reference, labels, baseline, 1,
            HostRunner(),
        )  # fmt: skip
        files = {p.name: p.read_bytes() for p in [art.path, *art.companions]}
    return art, res, files, {"node": socket.gethostname(), "pid": os.getpid(), "seconds": time.perf_counter() - t0}


class _RaySearch:
    """The search's candidates as Ray tasks (one CPU each, retried twice if their worker is lost). Each
    pruned model (one distillation per ratio, in the driver) and the golden set go into Ray's object store
    once and every task of that ratio reads them from there."""

    def __init__(self, stage: _Stage):
        import ray

        self.ray, self.stage = ray, stage
        self.task = ray.remote(num_cpus=1, max_retries=2)(_measure_on_worker)
        self.batch = max(1, int(ray.cluster_resources().get("CPU", 1)))
        with np.load(stage.tmp / "golden.npz") as z:
            self.golden = ray.put({k: z[k] for k in z.files})
        self.models: dict[float, Any] = {}

    @classmethod
    @contextlib.contextmanager
    def connected(cls, stage: _Stage, address: str) -> Iterator[_RaySearch]:
        from edgelm.validate.farm import connect

        disconnect = connect(address)
        try:
            yield cls(stage)
        finally:
            disconnect()

    def evaluate(self, wave: list, cplan: Callable, work: Path) -> None:
        """Try ``wave`` (search candidates) at once; fill each one's artifact (written under ``work``),
        result, accuracy, size and placement."""
        stage, ref, ray = self.stage, self.stage.ref, self.ray
        stage.step(f"{len(wave)} {wave[0].format} candidates on Ray: " + ", ".join(_cand_label(c) for c in wave))
        refs, plans = [], [cplan(c) for c in wave]
        for c, plan in zip(wave, plans, strict=True):
            if c.sparsity not in self.models:  # the ratio's distillation runs once, here
                self.models[c.sparsity] = ray.put(ref.variants.get(c.sparsity)[0])
            calibration = ref.calibration if schemes.get(plan.quant.scheme).needs_calibration else None
            estimate = stage.cost(ref.variants.structure(c.sparsity), plan.format, plan.quant)
            refs.append(
                self.task.remote(
                    self.models[c.sparsity],
                    plan,
                    c.sparsity,
                    stage.recipe.seq_len,
                    calibration,
                    stage.adapter_modules,
                    self.golden,
                    ref.variants.get(c.sparsity)[1],
                    ref.labels,
                    ref.baseline,
                    estimate,
                    stage.loaded.num_parameters * 4,
                )
            )
        for c, plan, r in zip(wave, plans, refs, strict=True):
            try:
                art, res, files, where = ray.get(r)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if not isinstance(cause, EdgeLMError):
                    raise ExportError(f"{_cand_label(c)} failed on its Ray worker: {str(exc).strip()[-500:]}") from None
                _reject(c, plan, cause)  # a converter failure, as in the sequential search
                continue
            except ray.exceptions.RayError as exc:  # the cluster lost it (retries spent): not the candidate's fault
                raise ExportError(
                    f"the Ray cluster lost the {_cand_label(c)} candidate ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0]}); run again, or without --ray"
                ) from None
            directory = work / f"{plan.format}-{len(list(work.iterdir()))}"
            directory.mkdir()
            for name, data in files.items():
                (directory / name).write_bytes(data)
            art.path = directory / art.path.name
            art.companions = [directory / p.name for p in art.companions]
            _measured(c, art, res)
            c.placement, c.seconds = where, where["seconds"]


def _measured(c, art: exporters.Artifact, res: ArtifactResult) -> None:
    """A search candidate's artifact and result, with the figures the search reads from them."""
    c.artifact, c.result = art, res
    c.size_mb, c.accuracy = res.size_mb, res.fidelity.get("accuracy")
    c.accuracy_drop = res.fidelity.get("accuracy_drop")


def _reject(c, plan: FormatPlan, exc: Exception) -> None:
    """A search candidate whose export failed: rejected with the reason; the search goes on."""
    c.result = ArtifactResult(file="", format=plan.format, quant=c.label, delegate=plan.delegate, error=str(exc))


def _cand_label(c) -> str:
    return f"{c.label}" + (f" ({c.sparsity:.0%} pruned)" if c.sparsity else "")


__all__ = ["PipelineOptions", "captured_output", "export_for_device", "prepare"]
