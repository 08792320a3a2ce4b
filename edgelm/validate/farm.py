"""A device farm: one bundle validated on several runners, one after another or concurrently on Ray.

``edgelm validate BUNDLE --runner A --runner B ...`` runs :func:`validate_many`: each runner's artifacts
(:func:`edgelm.validate.bundle.run_bundle`), then the runtime_tests suite on each runner's stored results, in
the runners' order, so validation.json and the report's side-by-side table get every runner's rows. A runner
that fails (no device, an unreachable board) or drops is reported and the others finish.

With ``--ray [ADDRESS]`` each runner is a Ray actor (``RunnerActor``, :func:`_actor_class`): actors run in
parallel, each one's calls one at a time, so a board is never used by two jobs at once. ``ADDRESS`` is
``local`` (a Ray instance started on this machine and stopped at the end), ``auto`` (the cluster this machine
belongs to) or ``ray://host:10001`` (Ray Client). An actor reads the bundle from its path and writes the
results beside it: on a cluster, keep bundles on a filesystem every node mounts at the same path (the actor
says so when it cannot see the bundle). Ray is an optional extra (``pip install edgelm[ray]``) imported only
here, only with ``--ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.bundle import Bundle
from edgelm.errors import EdgeLMError, ValidationError

ProgressFn = Callable[[str, int, int], None]


class RayNotAvailable(EdgeLMError):
    """``--ray`` was given and Ray is not installed or the cluster cannot be reached."""

    exit_code = 2


@dataclass
class RunnerOutcome:
    """One runner's part of a farm run: its name (the validation.json key), the results folder, where it
    ran (``{"node", "pid"}`` under Ray), and the error that stopped it before any result (else None)."""

    spec: str
    name: str | None = None
    results: Path | None = None
    placement: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def connect(address: str) -> Callable[[], None]:
    """Connect to Ray (see the module doc for ``address``). Returns the function that disconnects (it stops
    a local instance). Raises RayNotAvailable: Ray not installed, or the cluster unreachable."""
    try:
        import ray
    except ImportError:
        raise RayNotAvailable(
            "--ray needs Ray: pip install 'edgelm[ray]' (or pip install 'ray[tune]'), then run again"
        ) from None
    if ray.is_initialized():
        return lambda: None
    from exporters.decoder import quiet_stderr

    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        with quiet_stderr():  # Ray's start-up and token notices
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
            else:
                ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayNotAvailable(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    return ray.shutdown


def _run_one(bundle_path: str, spec: str, runner_options: dict, run_options: dict) -> dict:
    """What a runner's job does (in an actor, or in this process): build the runner for the bundle, run its
    artifacts, store the raw results. Returns ``{"name", "results", "placement", "seconds"}``."""
    from edgelm.validate.bundle import bundle_runner, run_bundle

    if not Path(bundle_path).is_dir():
        raise ValidationError(
            f"{bundle_path} is not visible on node {socket.gethostname()}: keep bundles on a filesystem every "
            "Ray node mounts at the same path"
        )
    bundle = Bundle.load(bundle_path)
    runner = bundle_runner(bundle, spec, **runner_options)
    t0 = time.time()
    results = run_bundle(bundle, runner, **run_options)
    placement = {"node": socket.gethostname(), "pid": os.getpid(), "started_unix": t0, "finished_unix": time.time()}
    info = json.loads((results / "runner.json").read_text())
    info["placement"] = placement
    (results / "runner.json").write_text(json.dumps(info, indent=2) + "\n")
    return {"name": runner.name, "results": str(results), "placement": placement, "seconds": time.time() - t0}


def _actor_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=0)
    class RunnerActor:
        """One runner (board, phone, emulator): its calls run one at a time."""

        def run(self, bundle_path: str, spec: str, runner_options: dict, run_options: dict) -> dict:
            return _run_one(bundle_path, spec, runner_options, run_options)

    return RunnerActor


def run_runners(
    bundle: Bundle,
    specs: list[str],
    runner_options: dict,
    run_options: dict,
    *,
    ray_address: str | None = None,
    progress: ProgressFn | None = None,
) -> list[RunnerOutcome]:
    """Run the bundle on every runner in ``specs`` (sequentially, or as Ray actors with ``ray_address``).
    A runner that raises EdgeLMError, or whose actor dies, gets its ``error``; the others go on.
    Raises RayNotAvailable (``ray_address`` given and Ray missing or unreachable)."""
    outcomes = [RunnerOutcome(s) for s in specs]
    if ray_address is None:
        for k, o in enumerate(outcomes):
            if progress:
                progress(f"runner {o.spec}", k, len(outcomes))
            try:
                _fill(o, _run_one(str(bundle.path), o.spec, runner_options, run_options))
            except EdgeLMError as exc:
                o.error = str(exc)
        return outcomes
    with contextlib.ExitStack() as stack:
        stack.callback(connect(ray_address))  # disconnects last
        import ray

        actor_cls = _actor_class()
        actors = [actor_cls.remote() for _ in specs]
        stack.callback(lambda: [ray.kill(a) for a in actors])
        pending = {
            a.run.remote(str(bundle.path.resolve()), o.spec, runner_options, run_options): o
            for a, o in zip(actors, outcomes, strict=True)
        }
        done = 0
        if progress:
            progress(f"{len(specs)} runners on Ray: {', '.join(specs)}", 0, len(specs))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            o = pending.pop(ready[0])
            try:
                _fill(o, ray.get(ready[0]))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
                o.error = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            except ray.exceptions.RayActorError as exc:
                o.error = f"the Ray actor running {o.spec} died: {str(exc).splitlines()[0]}"
            except ray.exceptions.RayError as exc:  # lost objects, a dead node, out of memory
                o.error = f"Ray lost the run of {o.spec}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            done += 1
            if progress and pending:
                progress(f"waiting for {', '.join(p.spec for p in pending.values())}", done, len(specs))
    return outcomes


def _fill(o: RunnerOutcome, got: dict) -> None:
    o.name, o.results, o.placement, o.seconds = got["name"], Path(got["results"]), got["placement"], got["seconds"]


def validate_many(
    bundle: Bundle,
    specs: list[str],
    runner_options: dict,
    run_options: dict,
    *,
    ray_address: str | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[dict], list[RunnerOutcome]]:
    """:func:`run_runners`, then the runtime_tests suite on each runner's results (in ``specs`` order), which
    writes validation.json and report.md. Returns (the records of the runners that ran, every outcome).
    Raises ValidationError when the suite itself errors, RayNotAvailable."""
    from edgelm.validate.bundle import VALIDATION_FILE, run_runtime_tests

    if len(set(specs)) != len(specs):
        raise ValidationError(f"a runner is given twice: {', '.join(specs)}")
    from edgelm.validate.bundle import bundle_runner

    names = {}
    for spec in specs:  # two specs for one runner (ssh: and its URL, profile and what it names) would collide
        try:
            name = bundle_runner(bundle, spec, **runner_options).name
        except EdgeLMError:
            continue  # reported when it runs (it may exist only on a Ray node)
        if name in names:
            raise ValidationError(f"--runner {names[name]} and --runner {spec} are the same runner ({name})")
        names[name] = spec
    outcomes = run_runners(bundle, specs, runner_options, run_options, ray_address=ray_address, progress=progress)
    records = []
    for o in outcomes:
        if o.error is not None:
            continue
        if progress:
            progress(f"runtime_tests on {o.name}", 0, 1)
        rc, output = run_runtime_tests(bundle, o.name, o.results)
        if rc not in (0, 1):
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise ValidationError(f"runtime_tests could not run for {o.name} (pytest exit {rc}):\n{tail}")
        records.append(json.loads((bundle.path / VALIDATION_FILE).read_text())["runners"][o.name])
    return records, outcomes
