"""Validate an export bundle (``dist/<device>/``) on a runner: what ``edgelm validate`` and ``runtime_tests/`` do.

Three steps, each usable alone:

1. :func:`run_bundle` runs the bundle's artifacts on a runner (host, emulator, a board over SSH, a phone over
   adb) on the golden set and an optional labeled eval set, and stores each artifact's raw result as it
   arrives under ``<bundle>/validation/<runner>/`` (outputs as ``.npy``, timings as JSON). If the runner
   drops, what was received is kept and the rest is marked "not run".
2. :func:`evaluate` turns those raw results into checks: each artifact's sha256 against the manifest (with
   its companion files), golden outputs within a tolerance that depends on the quantization, task accuracy
   within the recipe's gate, latency recorded (p50/p90, warm-up, runs; emulated latency is functional only).
3. :func:`write_validation` merges the runner's record into ``<bundle>/validation.json`` and rewrites the
   validation part of ``report.md``: one section per runner and a side-by-side table of every artifact on
   every runner (accuracy, top-1 agreement, cosine, max error, difference from the host's outputs).

numpy and the runners only: no torch (DESIGN.md: the runtime side imports no torch).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import exporters
from edgelm import tasks
from edgelm.bundle import Bundle
from edgelm.errors import ValidationError
from edgelm.fsutil import refuse_symlink, write_directory, write_text_atomic
from edgelm.report import render_validation_markdown
from edgelm.validate.metrics import accuracy, fidelity, latency_stats, top1_agreement
from edgelm.validate.runner import ArtifactRun, BundleJob, Runner, RunnerDropped, RunResult
from exporters.cascade import is_cascade

VALIDATION_FILE = "validation.json"
RESULTS_DIR = "validation"
EVAL_FILE = "eval.npz"
#: report.md from this line on is rewritten by every ``edgelm validate``
REPORT_MARKER = "<!-- edgelm validate: the sections below are rewritten by `edgelm validate` -->"
#: What an artifact's status can be in validation.json.
STATUSES = ("passed", "failed", "error", "skipped", "not run")

ProgressFn = Callable[[str, int, int], None]


def runner_slug(name: str) -> str:
    """A directory name for a runner: ``ssh://pi@10.0.0.2:22`` -> ``ssh-pi@10.0.0.2-22``."""
    return re.sub(r"[^A-Za-z0-9@._-]+", "-", name.replace("ssh://", "ssh-")).strip("-") or "runner"


def encode_eval_set(
    bundle: Bundle,
    data: str | os.PathLike,
    out: Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
) -> dict:
    """Tokenize a labeled eval file with the bundle's own tokenizer and write ``out`` (``eval.npz``: int64
    ``input_ids``/``attention_mask`` [M, seq_len], int64 ``labels`` [M]). Returns ``{"source", "rows"}``.
    Raises DataError (unreadable file, no label column, unknown labels) or ValidationError (embedding model)."""
    from edgelm import data as data_mod
    from edgelm.errors import DataError

    if not tasks.for_kind(bundle.kind).uses_labels:
        raise ValidationError("--data is a labeled eval set for a classifier; this bundle holds an embedding model")
    dataset = data_mod.load_dataset(str(data), text_column, label_column, limit)
    if dataset.labels is None:
        raise DataError(f"{data} has no label column: the eval set needs labels (or pass --label-column)")
    labels = data_mod.label_indices(dataset.labels, bundle.manifest.labels)
    tokenizer = data_mod.load_tokenizer(bundle.path, bundle.seq_len)
    ids, mask = data_mod.encode(tokenizer, dataset)
    np.savez(out, input_ids=ids, attention_mask=mask, labels=labels)
    return {"source": dataset.source, "rows": len(dataset)}


class ResultStore:
    """A runner's raw results in ``<bundle>/validation/<runner>/``: per artifact ``<name>.json`` (status,
    error, the target's result) and ``<name>.outputs.npy`` / ``<name>.eval.npy`` (float32)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def save(self, run: ArtifactRun) -> None:
        d = self.directory
        entry = {
            "artifact": run.artifact,
            "error": run.error,
            "skipped": run.skipped,
            "result": run.result.result if run.result else None,
        }
        if run.result is not None:
            np.save(d / f"{run.artifact}.outputs.npy", run.result.outputs)
            if run.result.eval_outputs is not None:
                np.save(d / f"{run.artifact}.eval.npy", run.result.eval_outputs)
        (d / f"{run.artifact}.json").write_text(json.dumps(entry, indent=2) + "\n")

    def info(self) -> dict:
        """``runner.json``: the runner's description and the job's settings. Raises ValidationError if absent."""
        try:
            return json.loads((self.directory / "runner.json").read_text())
        except (OSError, ValueError):
            raise ValidationError(
                f"{self.directory} holds no runner results (runner.json): run `edgelm validate` first"
            ) from None

    def load(self, artifacts: list[str]) -> dict[str, ArtifactRun]:
        """The stored run of each artifact; one with no stored result is "not run"."""
        runs = {}
        for name in artifacts:
            f = self.directory / f"{name}.json"
            if not f.is_file():
                runs[name] = ArtifactRun(name, error=None, skipped=None)
                continue
            entry = json.loads(f.read_text())
            res = None
            if entry.get("result") is not None:
                ev = self.directory / f"{name}.eval.npy"
                res = RunResult(
                    np.load(self.directory / f"{name}.outputs.npy"),
                    entry["result"],
                    np.load(ev) if ev.is_file() else None,
                )
            runs[name] = ArtifactRun(name, res, entry.get("error"), entry.get("skipped"))
        return runs


def run_bundle(
    bundle: Bundle,
    runner: Runner,
    *,
    artifacts: list[str] | None = None,
    data: str | os.PathLike | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 20,
    progress: ProgressFn | None = None,
) -> Path:
    """Run the bundle's artifacts (all, or ``artifacts``) on ``runner`` and store the raw results in
    ``<bundle>/validation/<runner>/`` (replacing an earlier run of the same runner). ``data``: a labeled eval
    file, tokenized here with the bundle's tokenizer and run on the target beside the golden set.
    ``threads`` defaults to the recipe's (capped at this machine's cores for host and emulator).

    Returns the results directory. If the runner drops (:class:`RunnerDropped`), the results received so
    far are kept, the rest are recorded as "not run" and the reason in runner.json's ``dropped``.
    Raises ValidationError / DataError for a bad bundle, artifact name or eval file (nothing is written).
    """
    names = artifacts or bundle.artifact_names
    for n in names:
        bundle.artifact(n)
    if threads is None:
        threads = bundle.threads
        if threads and runner.kind in ("host", "emulator"):
            threads = min(threads, os.cpu_count() or 1)
    base = bundle.path / RESULTS_DIR
    for p in (base, base / runner_slug(runner.name)):  # a link there is neither followed nor deleted
        refuse_symlink(p, "results folder")
    created_base = not base.exists()

    def fill(tmp: Path) -> None:
        eval_info = None
        if data is not None:
            eval_info = encode_eval_set(
                bundle, data, tmp / EVAL_FILE, text_column=text_column, label_column=label_column, limit=limit
            )
        store = ResultStore(tmp)
        info = {
            **runner.describe(),
            "bundle": str(bundle.location),
            "device": bundle.device,
            "manifest_sha256": exporters.sha256_file(bundle.path / "manifest.json"),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "artifacts": names,
            "threads": threads,
            "warmup": warmup,
            "runs": runs,
            "eval_set": eval_info,
            "dropped": None,
        }
        job = BundleJob(
            bundle.path,
            names,
            bundle.file(bundle.manifest.golden.file),
            tmp / EVAL_FILE if eval_info else None,
            threads,
            warmup,
            runs,
            checksums={n: bundle.checksums(n) for n in names},
        )
        done = 0

        def on_result(run: ArtifactRun) -> None:
            nonlocal done
            store.save(run)
            done += 1
            if progress:
                progress(f"{names[min(done, len(names) - 1)]} on {runner.name}", done, len(names))

        if progress:
            progress(f"{names[0]} on {runner.name}", 0, len(names))
        t0 = time.perf_counter()
        try:
            runner.run_bundle(job, on_result)
        except RunnerDropped as exc:  # keep what was received: the record says the runner dropped
            info["dropped"] = str(exc)
        info["seconds"] = time.perf_counter() - t0
        (tmp / "runner.json").write_text(json.dumps(info, indent=2) + "\n")

    try:
        return write_directory(base / runner_slug(runner.name), fill)
    except BaseException:
        if created_base and base.is_dir() and not any(base.iterdir()):
            base.rmdir()
        raise


def _sha256_mismatches(bundle: Bundle, files: list[tuple[str, str]]) -> dict[str, str]:
    """For each ``(file, sha256 from the manifest)`` whose file in the bundle is missing or differs: file -> a
    line saying so."""
    return {f: line for f, want in files if (line := bundle.verify(f, want))}


def checksum_check(bundle: Bundle, name: str) -> dict:
    """sha256 of the artifact and each of its companion files against the manifest."""
    files = list(bundle.checksums(name).items())
    bad = _sha256_mismatches(bundle, files)
    return tasks.check(
        not bad,
        len(files) - len(bad),
        len(files),
        "; ".join(bad.values()) if bad else f"{len(files)} file(s) match the manifest",
    )


def golden_check(bundle: Bundle, name: str, fid: dict, ref: np.ndarray) -> dict:
    """Golden outputs within the quantization's tolerance: the task's cosine, top-1 and max-error gates
    (:func:`edgelm.tasks.gate_checks`) in one check. An early-exit cascade is compared with the PyTorch
    cascade at its threshold by top-1 agreement only: where quantization moves a confidence across the
    threshold another exit answers, whose logits differ by design."""
    plan = bundle.plan(name)
    checks = tasks.gate_checks(tasks.for_kind(bundle.kind), fid, plan.gates, plan.quant.scheme, reference=ref)
    kept = ("min_top1_agreement",) if is_cascade(name) else ("min_cosine", "min_top1_agreement", "max_abs_error")
    checks = {k: c for k, c in checks.items() if k in kept}
    value = {
        "cosine_mean": fid["cosine_mean"],
        "max_abs_error": fid["max_abs_error"],
        "top1_agreement": fid.get("top1_agreement"),
    }
    return _as_one_check(checks, value, f"within the {plan.quant.scheme} tolerance")


def _as_one_check(checks: dict[str, dict], value, passed_detail: str) -> dict:
    """Several gate checks as one: passed when all pass, the limits by gate, the failures' details (or
    ``passed_detail``)."""
    fails = [c["detail"] for c in checks.values() if not c["passed"]]
    return tasks.check(
        not fails, value, {k: c["limit"] for k, c in checks.items()}, "; ".join(fails) if fails else passed_detail
    )


def generation_check(bundle: Bundle, name: str, res) -> tuple[dict, dict]:
    """A decoder's golden check: its greedy tokens against the reference's (token agreement) and its
    perplexity over the reference's on the golden window, judged by the text-generation gates in one check.
    Returns (fidelity, check)."""
    from edgelm.generation import token_agreement

    golden, plan = bundle.golden, bundle.plan(name)
    agree = token_agreement(golden["reference_tokens"], res.outputs.astype(np.int64))
    ppl, ref_ppl = res.result.get("perplexity"), golden.get("reference_perplexity")
    fid = {
        "token_agreement": agree["agreement"],
        "mean_prefix": agree["mean_prefix"],
        "prompts": agree["prompts"],
        "perplexity": ppl,
        "reference_perplexity": float(ref_ppl) if ref_ppl is not None and ppl is not None else None,
        "perplexity_ratio": ppl / float(ref_ppl) if ref_ppl is not None and ppl is not None else None,
    }
    checks = tasks.gate_checks(tasks.TEXT_GENERATION, fid, plan.gates, plan.quant.scheme)
    checks = {k: c for k, c in checks.items() if k != "max_size_mb"}
    value = {"token_agreement": fid["token_agreement"], "perplexity_ratio": fid["perplexity_ratio"]}
    return fid, _as_one_check(checks, value, "; ".join(c["detail"] for c in checks.values()))


def accuracy_check(bundle: Bundle, name: str, fid: dict) -> dict | None:
    """Task accuracy on the golden labels within the recipe's max drop (None without labels)."""
    plan = bundle.plan(name)
    checks = tasks.gate_checks(tasks.for_kind(bundle.kind), fid, plan.gates, plan.quant.scheme)
    return checks.get("max_accuracy_drop")


def latency_check(result: dict, warmup: int, runs: int, emulated: bool) -> tuple[dict, dict]:
    """Latency was recorded: ``runs`` finite positive samples after ``warmup``. Returns (stats, check)."""
    samples = [float(x) for x in result.get("latency_samples_ms") or []]
    ok = len(samples) == runs and runs > 0 and all(math.isfinite(x) and x > 0 for x in samples)
    stats = latency_stats(samples) if samples else {}
    stats.update(
        warmup=result.get("warmup", warmup),
        runs=len(samples),
        seq_len=result.get("latency_seq_len"),
        threads=result.get("threads"),
        emulated=emulated,
    )
    detail = f"{len(samples)} of {runs} samples after {warmup} warm-up runs" + (
        "; emulated: functional only, not device speed" if emulated else ""
    )
    return stats, tasks.check(ok, stats.get("p50_ms"), None, detail)


def per_sentence(result: dict, which: str) -> dict:
    """Per-sentence latency (ms: mean, p50, p90 over the rows at their real lengths) and, for an early-exit
    cascade, the distribution of exits (share of rows per exit layer, 0-1; mean layers run) of the ``golden``
    or ``eval`` rows in a target result. Keys ``sentence_latency`` / ``exits`` (``eval_`` prefixed for eval)."""
    prefix = "" if which == "golden" else "eval_"
    out: dict = {}
    times = result.get(f"{prefix}row_latency_ms")
    if times:
        t = np.asarray(times, np.float64)
        out[f"{prefix}sentence_latency"] = {
            "mean_ms": float(t.mean()),
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "rows": len(t),
        }
    exits = result.get(f"{prefix}exit_layers")
    if exits:
        layers, counts = np.unique(np.asarray(exits), return_counts=True)
        out[f"{prefix}exits"] = {
            "share": {str(int(k)): float(c / len(exits)) for k, c in zip(layers, counts, strict=True)},
            "mean_layers": float(np.mean(exits)),
        }
    return out


def _host_outputs(bundle: Bundle, name: str, eval_source: str | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The host runner's stored outputs of ``name`` (golden, and eval when run on the same eval source)."""
    store = ResultStore(bundle.path / RESULTS_DIR / "host")
    f = store.directory / f"{name}.outputs.npy"
    if not f.is_file():
        return None, None
    ev = store.directory / f"{name}.eval.npy"
    try:
        same_eval = eval_source is not None and (store.info().get("eval_set") or {}).get("source") == eval_source
    except ValidationError:
        same_eval = False
    return np.load(f), (np.load(ev) if same_eval and ev.is_file() else None)


def evaluate(bundle: Bundle, results_dir: Path) -> dict:
    """The runner's record for validation.json from its stored raw results: per artifact a status, the
    fidelity numbers against PyTorch fp32, the difference from the host's outputs, latency, and checks
    (``sha256``, ``ran``, ``golden``, ``accuracy``, ``eval_accuracy``, ``latency``: each ``{"passed",
    "value", "limit", "detail"}``). Raises ValidationError when ``results_dir`` holds no run."""
    store = ResultStore(results_dir)
    info = store.info()
    names = info["artifacts"]
    runs = store.load(names)
    emulated = bool(info.get("emulated"))
    eval_labels = None
    if info.get("eval_set"):
        with np.load(results_dir / EVAL_FILE) as z:
            eval_labels = z["labels"]
    record = {k: v for k, v in info.items() if k != "artifacts"}
    record["artifacts"] = {}
    golden = bundle.manifest.golden
    golden_ok = not _sha256_mismatches(bundle, [(golden.file, golden.sha256)])
    bundle_checks = {
        "golden_sha256": tasks.check(
            golden_ok,
            None,
            None,
            "the golden set matches the manifest" if golden_ok else "the golden set differs from the manifest's sha256",
        )
    }
    adapters = bundle.manifest.adapters
    if adapters:  # the weights files of further swappable adapters (edgelm export --adapter)
        bad = list(_sha256_mismatches(bundle, [(a.file, a.sha256) for a in adapters]))
        bundle_checks["adapters_sha256"] = tasks.check(
            not bad,
            len(adapters) - len(bad),
            len(adapters),
            f"differ from the manifest: {', '.join(bad)}"
            if bad
            else f"{len(adapters)} adapter file(s) match the manifest",
        )
    for name in names:
        run, plan = runs[name], bundle.plan(name)
        rec = {
            "format": plan.format,
            "quant": plan.quant.scheme,
            "error": run.error,
            "skipped": run.skipped,
            "checks": {"sha256": checksum_check(bundle, name)},
        }
        if run.skipped:
            rec["status"] = "skipped" if rec["checks"]["sha256"]["passed"] else "failed"
        elif run.result is None:
            rec["status"] = "error" if run.error else "not run"
            rec["checks"]["ran"] = tasks.check(
                False, None, None, run.error or (f"not run: {info['dropped']}" if info.get("dropped") else "not run")
            )
        else:
            res = run.result
            rec["checks"]["ran"] = tasks.check(True, None, None, f"ran on {res.result.get('machine', '?')}")
            ref = bundle.reference(name)
            if bundle.kind == tasks.TEXT_GENERATION.kind and res.outputs.shape == ref.shape:
                rec["fidelity"], rec["checks"]["golden"] = generation_check(bundle, name, res)
                for k in ("speed", "speed_1_thread", "next_token"):
                    rec[k] = res.result.get(k)
            elif res.outputs.shape != ref.shape:
                rec["checks"]["golden"] = tasks.check(
                    False,
                    list(res.outputs.shape),
                    list(ref.shape),
                    f"outputs have shape {res.outputs.shape}, reference {ref.shape}",
                )
            else:
                fid = fidelity(res.outputs, ref, bundle.kind, bundle.labels, baseline_accuracy=bundle.baseline_accuracy)
                rec["fidelity"] = fid
                rec["checks"]["golden"] = golden_check(bundle, name, fid, ref)
                acc = accuracy_check(bundle, name, fid)
                if acc:
                    rec["checks"]["accuracy"] = acc
            host, host_eval = (
                (None, None)
                if info.get("kind") == "host"
                else _host_outputs(bundle, name, (info.get("eval_set") or {}).get("source"))
            )
            if host is not None and host.shape == res.outputs.shape and bundle.kind == tasks.TEXT_GENERATION.kind:
                from edgelm.generation import token_agreement

                same = token_agreement(host.astype(np.int64), res.outputs.astype(np.int64))
                rec["vs_host"] = {"token_agreement": same["agreement"], "mean_prefix": same["mean_prefix"]}
            elif host is not None and host.shape == res.outputs.shape:
                rec["vs_host"] = {"max_abs_diff": float(np.abs(res.outputs.astype(np.float64) - host).max())}
                if tasks.for_kind(bundle.kind).uses_labels:
                    rec["vs_host"]["top1_agreement"] = top1_agreement(res.outputs, host)
            if res.result.get("device_checks"):  # the app's whole-bundle checks (tokenizer, LlmModule text)
                rec["device_checks"] = res.result["device_checks"]
            if eval_labels is None and isinstance(res.result.get("eval"), dict):  # computed on the device (the app)
                rec["eval"] = {k: res.result["eval"].get(k) for k in ("accuracy", "rows", "source")}
            if eval_labels is not None and res.eval_outputs is not None:
                acc_ = accuracy(res.eval_outputs, eval_labels)
                rec["eval"] = {"accuracy": acc_, "rows": len(eval_labels)}
                limit = plan.gates.max_accuracy_drop
                if host_eval is not None:
                    drop = accuracy(host_eval, eval_labels) - acc_
                    rec["checks"]["eval_accuracy"] = tasks.check(
                        drop <= limit,
                        drop,
                        limit,
                        f"eval accuracy {acc_:.2f}%, {drop:+.2f} points below the same artifact on the host",
                    )
                else:
                    rec["checks"]["eval_accuracy"] = tasks.check(
                        True,
                        acc_,
                        None,
                        f"eval accuracy {acc_:.2f}% (no host run on the same eval set to compare with)",
                    )
            rec["latency"], rec["checks"]["latency"] = latency_check(res.result, info["warmup"], info["runs"], emulated)
            rec.update(per_sentence(res.result, "golden"))
            if res.eval_outputs is not None:
                rec.update(per_sentence(res.result, "eval"))
            for k in ("load_ms", "peak_rss_mb", "runtime", "machine"):
                rec[k] = res.result.get(k)
            rec["status"] = "passed" if all(c["passed"] for c in rec["checks"].values()) else "failed"
        record["artifacts"][name] = rec
    record["checks"] = bundle_checks
    record["passed"] = (
        not info.get("dropped")
        and all(c["passed"] for c in bundle_checks.values())
        and all(a["status"] in ("passed", "skipped") for a in record["artifacts"].values())
    )
    return record


def write_validation(bundle: Bundle, record: dict) -> Path:
    """Merge ``record`` (from :func:`evaluate`) into ``<bundle>/validation.json`` under its runner's name and
    rewrite the validation sections of ``report.md`` (both replaced atomically). Returns validation.json."""
    vpath = bundle.path / VALIDATION_FILE
    try:
        doc = json.loads(vpath.read_text())
        if doc.get("manifest_sha256") != record.get("manifest_sha256"):
            doc = {}  # from an earlier export of this directory: start afresh
    except (OSError, ValueError):
        doc = {}
    doc.update(bundle=str(bundle.location), device=bundle.device, manifest_sha256=record.get("manifest_sha256"))
    doc.setdefault("runners", {})[record["runner"]] = record
    write_text_atomic(vpath, json.dumps(doc, indent=2, default=str) + "\n")
    report = bundle.path / "report.md"
    text = report.read_text() if report.is_file() else f"# edgelm report: {bundle.device}\n"
    text = text.split(REPORT_MARKER)[0].rstrip() + "\n\n" + REPORT_MARKER + "\n\n" + render_validation_markdown(doc)
    write_text_atomic(report, text)
    return vpath


def bundle_runner(
    bundle: Bundle,
    spec: str,
    *,
    cpu: str | None = None,
    sysroot: Path | None = None,
    key_file: Path | None = None,
    known_hosts: Path | None = None,
    remote_python: str = "python3",
    remote_env: dict[str, str] | None = None,
) -> Runner:
    """The runner ``spec`` configured for this bundle's device profile (its ``[validation]`` table):

    - ``emulator``: the qemu CPU model is ``cpu``, else the profile's ``emulator_cpu``, else its big core where
      qemu has it (:func:`edgelm.validate.emulator.qemu_cpu_for`);
    - ``ssh`` (bare): the profile's ``ssh`` URL; ``adb`` (bare): the profile's ``adb_serial`` when it has one;
    - ``profile``: the profile's own ``runner``.

    Raises ValidationError / EmulatorError."""
    from edgelm.validate.runners import make_runner

    device = bundle.manifest.device
    val = device.validation
    if spec == "profile":
        spec = val.get("runner") or "host"
    if spec == "ssh":
        if not val.get("ssh"):
            raise ValidationError(
                f"the {bundle.device} profile names no SSH board ([validation] ssh): pass "
                "--runner ssh://user@host[:port]"
            )
        spec = val["ssh"]
    if spec == "adb" and val.get("adb_serial"):
        spec = f"adb:{val['adb_serial']}"
    if spec == "emulator" and cpu is None:
        from edgelm.validate.emulator import qemu_cpu_for

        cpu = val.get("emulator_cpu") or qemu_cpu_for(str(device.hardware.get("cpu", "")))[0]
    return make_runner(
        spec,
        emulator_cpu=cpu,
        sysroot=sysroot,
        key_file=key_file,
        known_hosts=known_hosts,
        remote_python=remote_python,
        remote_env=remote_env,
    )


def runtime_tests_dir() -> Path:
    """Where the runtime_tests suite is (installed with edgelm), found without importing it: edgelm runs the
    suite in its own pytest process and never imports it. Raises ValidationError if it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("runtime_tests")
    if spec is None or not spec.submodule_search_locations:
        raise ValidationError("the runtime_tests suite is not installed: reinstall edgelm (pip install edgelm)")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def run_runtime_tests(bundle: Bundle, runner_name: str, results_dir: Path, timeout_s: float = 600.0) -> tuple[int, str]:
    """Run the ``runtime_tests`` pytest suite on stored results (``--results``: it checks, it does not run
    the artifacts again); the suite writes validation.json and the report sections. Returns (pytest's exit
    code, its output). Raises ValidationError if pytest cannot run or times out."""
    import subprocess
    import sys

    suite = runtime_tests_dir()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(suite),
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(suite),
        "--tb=line",
        "-rfs",
        "--bundle",
        str(bundle.path),
        "--runner",
        runner_name,
        "--results",
        str(results_dir),
    ]
    for name in ResultStore(results_dir).info().get("artifacts", []):  # those run (validate --artifact picks)
        cmd += ["--artifact", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise ValidationError("pytest is not installed: pip install pytest") from None
    except subprocess.TimeoutExpired:
        raise ValidationError(f"runtime_tests did not finish within {timeout_s:.0f} s") from None
    return proc.returncode, proc.stdout + proc.stderr


def validate(bundle: Bundle, runner: Runner, *, progress: ProgressFn | None = None, **run_options) -> tuple[dict, str]:
    """What ``edgelm validate`` does: :func:`run_bundle` (``run_options``: artifacts, data, text_column,
    label_column, limit, threads, warmup, runs), then the runtime_tests suite on the stored results, which
    writes validation.json and report.md. Returns (this runner's record, the suite's output).
    Raises ValidationError / DataError for bad input, or when the suite itself errors (not a failed check)."""
    results = run_bundle(bundle, runner, progress=progress, **run_options)
    if progress:
        progress("runtime_tests", 0, 1)
    rc, output = run_runtime_tests(bundle, runner.name, results)
    if rc not in (0, 1):  # 0: all passed, 1: some checks failed; anything else is the suite's own error
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise ValidationError(f"runtime_tests could not run (pytest exit {rc}):\n{tail}")
    doc = json.loads((bundle.path / VALIDATION_FILE).read_text())
    record = doc["runners"][runner.name]
    if (rc == 0) != bool(record["passed"]) and not record.get("dropped"):
        raise ValidationError(
            f"runtime_tests (exit {rc}) and validation.json (passed={record['passed']}) disagree:\n{output[-2000:]}"
        )
    return record, output
