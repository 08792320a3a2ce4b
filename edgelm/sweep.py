"""Hyper-parameter sweeps as Ray Tune trials: ``edgelm finetune --sweep`` and ``edgelm hypernet train --sweep``.

A sweep is a grid (``--sweep lr=1e-4,5e-5 --sweep epochs=2,3``: every combination) run by Ray Tune's
``Tuner`` with its own progress output; each trial is one ordinary job (:func:`edgelm.compress.jobs.run_finetune`
or :func:`edgelm.adapt.hypernet.meta_train`) writing its checkpoint to ``OUT/trials/<trial>/`` and reporting its
metric to Tune. The best trial by the metric (highest) is copied to ``OUT/`` itself, so ``OUT`` is used as
after a single run, and ``OUT/sweep.json`` lists every trial: its values, metric, where it ran and its folder.
Ray is imported only here (the optional extra ``edgelm[ray]``); :func:`edgelm.validate.farm.connect` starts or
joins the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from edgelm.errors import RecipeError

#: What each sweepable job's ``--sweep`` keys may be, with their types.
FINETUNE_KEYS = {"lr": float, "epochs": int, "batch_size": int, "seed": int, "optimizer": str}
HYPERNET_KEYS = {"seed": int, "episodes": int, "rank": int}


def parse_sweep(items: list[str], keys: dict[str, type]) -> dict[str, list]:
    """``["lr=1e-4,5e-5", "epochs=2,3"]`` -> ``{"lr": [1e-4, 5e-5], "epochs": [2, 3]}``, each value parsed with
    its key's type. Raises RecipeError: an unknown key, a value of the wrong type, an empty list."""
    space: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in keys:
            raise RecipeError(f"--sweep {item!r}: use KEY=V1,V2,... with KEY one of {', '.join(keys)}")
        try:
            parsed = [keys[key](v.strip()) for v in values.split(",") if v.strip()]
        except ValueError:
            raise RecipeError(f"--sweep {item!r}: {key} takes {keys[key].__name__} values") from None
        if not parsed:
            raise RecipeError(f"--sweep {item!r}: no values")
        space[key] = parsed
    return space


def _trial(config: dict, job: str, out: str, args: dict) -> None:
    """One Tune trial: run ``job`` with this trial's values (``config``) and the fixed ``args``, into
    ``out/trials/<values>/``; report its metrics (module-level: workers import it)."""
    from ray import tune

    folder = Path(out) / "trials" / "-".join(f"{k}={v}" for k, v in sorted(config.items()))
    metric = JOBS[job](dict(config), folder, args)
    tune.report({**metric, "node": socket.gethostname(), "pid": os.getpid(), "checkpoint": str(folder)})


def _finetune_job(values: dict, out: Path, args: dict) -> dict:
    import torch

    from edgelm.compress.jobs import run_finetune
    from edgelm.compress.train import TrainConfig

    torch.set_num_threads(1)  # one CPU per trial
    cfg = TrainConfig(**{**args["cfg"], **values})
    result = run_finetune(args["model"], args["data"], out, eval_data=args["eval_data"], cfg=cfg, **args["limits"])
    best = next(e for e in result.history if e.epoch == result.best_epoch)
    return {"eval_accuracy": best.eval_accuracy, "train_loss": best.train_loss, "best_epoch": result.best_epoch}


def _hypernet_job(values: dict, out: Path, args: dict) -> dict:
    import torch

    from edgelm.adapt.hypernet import HyperConfig, meta_train

    torch.set_num_threads(1)
    cfg = HyperConfig(**{**args["cfg"], **values})
    rec = meta_train(args["model"], Path(args["data_dir"]), out, cfg)
    val = rec["validation"]
    return {  # selected by the meta-validation accuracy; with --val-task none, by the last query accuracy
        "validation_accuracy": val["best_accuracy"] if val else rec["query_accuracy_last"],
        "query_accuracy": rec["query_accuracy_last"],
        "query_loss": rec["loss_last"],
    }


JOBS: dict[str, Callable[[dict, Path, dict], dict]] = {"finetune": _finetune_job, "hypernet": _hypernet_job}
#: What the trials report, kept in sweep.json.
REPORTED = ("eval_accuracy", "train_loss", "best_epoch", "validation_accuracy", "query_accuracy", "query_loss")
#: The metric each job's sweep maximises.
METRICS = {"finetune": "eval_accuracy", "hypernet": "validation_accuracy"}


def run_sweep(job: str, space: dict[str, list], args: dict, out: Path, *, address: str = "local") -> dict:
    """Run ``job`` (``finetune`` or ``hypernet``) over the grid ``space`` as Ray Tune trials, one CPU each;
    copy the best trial's checkpoint (highest :data:`METRICS` value) to ``out`` and write ``out/sweep.json``.
    ``args``: the job's fixed arguments. Returns the sweep record (``trials``, ``best``, ``metric``).
    Raises RayNotAvailable, RecipeError (an empty space; every trial failed)."""
    from edgelm.validate.farm import connect

    if not space:
        raise RecipeError("--sweep needs at least one KEY=V1,V2")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    disconnect = connect(address)
    try:
        from ray import tune

        grid = {k: tune.grid_search(v) for k, v in space.items()}
        trainable = tune.with_parameters(_trial, job=job, out=str(out.resolve()), args=args)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space=grid,
            tune_config=tune.TuneConfig(metric=METRICS[job], mode="max"),
            run_config=tune.RunConfig(name=f"edgelm-{job}", storage_path=str((out / "tune").resolve()), verbose=1),
        )
        # Ctrl-C must stop the sweep as an interruption (exit 130), not end Tune quietly as if it had finished
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            results = tuner.fit()
        finally:  # Tune installs its own Ctrl-C handler: give the caller's back (main thread only)
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        trials = []
        for r in results:
            values = {k: r.config[k] for k in space}
            trials.append(
                {
                    "values": values,
                    "metrics": {k: (r.metrics or {}).get(k) for k in REPORTED if k in (r.metrics or {})},
                    "error": None if r.error is None else str(r.error).strip().splitlines()[-1],
                    "node": (r.metrics or {}).get("node"),
                    "pid": (r.metrics or {}).get("pid"),
                    "checkpoint": (r.metrics or {}).get("checkpoint"),
                }
            )
    finally:
        disconnect()
    ok = [t for t in trials if t["error"] is None and t["metrics"].get(METRICS[job]) is not None]
    if not ok:
        raise RecipeError(f"every trial of the sweep failed: {trials[0]['error'] if trials else 'no trial ran'}")
    best = max(ok, key=lambda t: t["metrics"][METRICS[job]])
    if not Path(best["checkpoint"]).is_dir():
        raise RecipeError(
            f"the best trial's checkpoint {best['checkpoint']} is not on this machine (node {best['node']}): "
            "on a multi-node cluster put --out on a filesystem every node mounts"
        )
    for item in Path(best["checkpoint"]).iterdir():  # the best trial's checkpoint becomes OUT itself
        dest = out / item.name
        if item.is_dir():
            shutil.copytree(item, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dest)
    record = {"job": job, "metric": METRICS[job], "space": space, "trials": trials, "best": best}
    (out / "sweep.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
