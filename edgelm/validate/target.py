"""The target-side runner script: run one artifact on a golden set and time it. numpy + the runtime only.

    python -m edgelm.validate.target ARTIFACT --golden golden.npz --out DIR [--threads N] [--warmup 5] [--runs 20]
                                     [--adapter WEIGHTS] [--eval eval.npz]

Reads from ``golden.npz``: ``input_ids``/``attention_mask`` int64 [N, seq_len] (right-padded), and
``latency_input_ids``/``latency_attention_mask`` int64 [1, seq_len] (the timing input). Writes
``DIR/outputs.npy`` (float32 [N, ...], one row per golden input, run at batch 1 with padding trimmed) and
``DIR/result.json``: load time (ms), latency samples and p50/p90 (ms), each golden row's latency (ms, its real
length; ``row_latency_ms``), the exit layer of each row for an early-exit cascade (``exit_layers``), peak RSS
(MB) of this process, runtime versions. Exit code 0 on success, 3 if the artifact cannot be loaded or run (message on stderr).
``--adapter``: run with another adapter's weights file (``.adapter.data`` / ``.adapter.ptd``) swapped in.
``--eval``: also run a labeled eval set (``input_ids``/``attention_mask`` int64 [M, seq_len]) and write its
outputs to ``DIR/eval_outputs.npy`` (float32 [M, ...]).

A generative bundle's golden set (``prompt_tokens`` int64 [P, L] padded with -1, ``reference_tokens`` int64
[P, T], ``reference_next_logits`` float32 [P, vocab], ``perplexity_tokens`` int64 [W], ``speed_prompt`` int64
[S], ``speed_new_tokens``) is run by :func:`run_generative`: greedy tokens per prompt (``outputs.npy``,
float32 [P, T], -1 after an EOS), perplexity over the window, prefill/decode speed at ``--threads`` and at 1
thread, and the decode-step latency (``--runs`` steps after ``--warmup``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


class ChecksumMismatch(Exception):
    """A file's sha256 differs from the manifest's: it is not loaded."""


def _peak_rss_mb() -> float:
    """Peak resident set size of this process, MB. Linux: ``VmHWM`` from /proc (``ru_maxrss`` would carry
    over the parent's peak across fork+exec); elsewhere ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def _outputs(session, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[float], list[int] | None]:
    """Run every row of int64 [N, seq_len] ``ids``/``mask`` at batch 1 with its padding trimmed. Returns
    ``(outputs float32 [N, ...], each row's latency in ms, each row's exit layer or None)``: the exit layers
    of an early-exit cascade (its ``exit_layer`` output), None for a whole model."""
    from exporters.base import trim_padding

    rows, times, exits = [], [], []
    for i in range(len(ids)):
        feeds = trim_padding({"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})
        t = time.perf_counter()
        out = session.run(feeds)
        times.append((time.perf_counter() - t) * 1000.0)
        rows.append(next(iter(out.values())))
        if "exit_layer" in out:
            exits.append(int(out["exit_layer"][0]))
    return np.concatenate(rows, axis=0).astype(np.float32), times, (exits or None)


def run(
    artifact: Path,
    golden: Path,
    out: Path,
    threads: int | None,
    warmup: int,
    runs: int,
    adapter: Path | None = None,
    eval_set: Path | None = None,
    checksums: dict[str, str] | None = None,
) -> dict:
    """Run ``artifact`` on every golden input (and every ``eval_set`` input), then time ``runs`` calls after
    ``warmup`` on the timing input. ``checksums``: ``{file beside the artifact: sha256}`` checked before
    anything is loaded (ChecksumMismatch). Returns the result dict (also written to ``out/result.json``)."""
    import exporters
    from exporters.base import sha256_file

    for name, want in (checksums or {}).items():
        f = artifact.parent / Path(name).name
        got = sha256_file(f) if f.is_file() else "missing"
        if got != want:
            raise ChecksumMismatch(f"sha256 of {f.name} is {got[:12]}, the manifest says {want[:12]}: not loaded")

    data = np.load(golden)
    if "prompt_tokens" in data.files:
        return run_generative(artifact, data, out, threads, warmup, runs)
    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    session = exporters.load(artifact, threads=threads, adapter=adapter)
    load_ms = (time.perf_counter() - t0) * 1000.0
    timing = {"input_ids": data["latency_input_ids"], "attention_mask": data["latency_attention_mask"]}
    for _ in range(warmup):  # before the golden rows, whose per-row times are kept too
        session.run(timing)
    outputs_arr, row_ms, exits = _outputs(session, data["input_ids"], data["attention_mask"])
    out.mkdir(parents=True, exist_ok=True)
    eval_rows, eval_ms, eval_exits = None, None, None
    if eval_set is not None:
        ev = np.load(eval_set)
        eval_out, eval_ms, eval_exits = _outputs(session, ev["input_ids"], ev["attention_mask"])
        np.save(out / "eval_outputs.npy", eval_out)
        eval_rows = len(eval_out)
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(timing)
        samples.append((time.perf_counter() - t) * 1000.0)
    fmt = exporters.format_for_path(artifact)
    result = {
        "artifact": artifact.name,
        "adapter": adapter.name if adapter else None,
        "format": fmt,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "latency_seq_len": int(timing["input_ids"].shape[1]),
        "latency_samples_ms": samples,
        "load_ms": load_ms,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_load_mb": rss_before,
        "runtime": exporters.get(fmt).runtime_versions(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch_imported": "torch" in sys.modules,
        "eval_rows": eval_rows,
        "row_latency_ms": row_ms,
        "exit_layers": exits,
        "eval_row_latency_ms": eval_ms,
        "eval_exit_layers": eval_exits,
    }
    np.save(out / "outputs.npy", outputs_arr)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_generative(artifact: Path, data, out: Path, threads: int | None, warmup: int, runs: int) -> dict:
    """Run a decoder artifact on a generative golden set (see the module doc). Returns the result dict (also
    written to ``out/result.json``); ``out/outputs.npy`` holds the greedy tokens."""
    import exporters
    from edgelm import generation
    from exporters.decoder import load_decoder, runtime_versions

    rss_before = _peak_rss_mb()
    t0 = time.perf_counter()
    session = load_decoder(artifact, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1000.0
    width = data["reference_tokens"].shape[1]
    rows, first = [], []
    for row in data["prompt_tokens"]:
        tokens, logits = generation.greedy_tokens(session, generation.unpad(row), width)
        rows.append(tokens)
        first.append(logits)
    first_arr = np.stack(first).astype(np.float32)
    ref_first = data["reference_next_logits"]
    window = data["perplexity_tokens"]
    ppl = generation.perplexity(session, window) if window.size > 1 else None
    prompt = [int(x) for x in data["speed_prompt"]]
    new = max(int(data["speed_new_tokens"]), warmup + runs + 1)
    fast = generation.speed(session, prompt, new)
    samples = fast.pop("step_ms")[warmup : warmup + runs]
    peak_rss = _peak_rss_mb()  # before a second session is opened for the 1-thread figures
    one_thread = None
    if threads and threads > 1:
        one = load_decoder(artifact, threads=1)
        one_thread = generation.speed(one, prompt, new)
        one_thread.pop("step_ms")
    result = {
        "artifact": artifact.name,
        "format": exporters.format_for_path(artifact),
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "latency_seq_len": 1,
        "latency_samples_ms": samples,
        "load_ms": load_ms,
        "perplexity": ppl,
        "perplexity_window": int(window.size),
        "speed": fast,
        "speed_1_thread": one_thread,
        "next_token": {
            "top1_agreement": float((first_arr.argmax(axis=1) == ref_first.argmax(axis=1)).mean()),
            "max_abs_error": float(np.abs(first_arr.astype(np.float64) - ref_first).max()),
        },
        "peak_rss_mb": peak_rss,
        "rss_before_load_mb": rss_before,
        "runtime": runtime_versions(artifact),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch_imported": "torch" in sys.modules,
        "eval_rows": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "outputs.npy", generation.pad_tokens(rows, width).astype(np.float32))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--golden", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--adapter", type=Path, default=None)
    p.add_argument("--eval", type=Path, default=None)
    p.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX", help="check before loading")
    a = p.parse_args(argv)
    checksums = dict(x.split("=", 1) for x in a.sha256)
    try:
        run(a.artifact, a.golden, a.out, a.threads, a.warmup, a.runs, a.adapter, a.eval, checksums)
    except Exception as exc:  # report any runtime failure as one line for the runner
        print(f"edgelm target: {a.artifact.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
