"""Benchmark: the accuracy-budget search one candidate at a time, and on Ray with 1 and 2 workers.

One run, on this host (CPU only), each search in its own process (`edgelm export --search`, the same inputs):
1. the SST-2 classifier fine-tuned from the packaged all-MiniLM-L6-v2 (``benchmarks/.cache/ft-8000``, made by
   ``benchmarks/compression_sst2.py``), the first ``--limit`` SST-2 dev sentences as the labeled data, ONNX,
   seq 128, no pruning, and a tight accuracy budget (``--max-accuracy-drop``) so that the search rejects
   several candidates before one fits;
2. sequential: ``edgelm export --search``; Ray: a local cluster of 1 worker node (``ray start --head
   --num-cpus 1``) and of 2 (a head and a worker node, 1 CPU each), ``--search --ray ADDRESS``;
3. per run: wall time, the chosen candidate (it must be the same), each tried candidate's time, and the
   machine's CPU utilisation over the run (busy / total jiffies of /proc/stat, all cores).

The projection for N nodes assumes what was measured: the driver's fixed part (load, reference, write, host
check: the sequential wall time minus its candidates' times) plus the candidates tried in batches of N, each
batch as long as its slowest candidate (the candidate times of the sequential run, in its order).

Results: ``benchmarks/results/search_scaling.{json,md}``.

    python benchmarks/search_scaling.py [--limit 300] [--max-accuracy-drop 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

from edgelm import hostinfo

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def ray_cluster(nodes: int, env: dict) -> tuple[str, Path]:
    """A local Ray cluster of ``nodes`` nodes with 1 CPU each; returns (address, its temp folder)."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Unix socket paths are at most 107 bytes
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = 6000 + secrets.randbelow(2000)
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir",
                    str(tmp), *common], check=True, capture_output=True, env=env)  # fmt: skip
    for _ in range(nodes - 1):
        subprocess.run(
            [ray, "start", "--address", f"127.0.0.1:{port}", *common], check=True, capture_output=True, env=env
        )
    return f"127.0.0.1:{port}", tmp


def ray_stop(env: dict, tmp: Path) -> None:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "stop", "--force"], capture_output=True, env=env)
    shutil.rmtree(tmp, ignore_errors=True)


def search(args, out: Path, profile: Path, data: Path, extra: list[str], env: dict) -> dict:
    """One `edgelm export --search` in its own process: wall time, CPU utilisation, the search summary."""
    busy0, total0 = cpu_jiffies()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "export", "--device", str(profile), "--model", str(CACHE / "ft-8000"),
         "--data", str(data), "--format", "onnx", "--seq-len", "128", "--search", "--max-sparsity", "0",
         "--max-accuracy-drop", str(args.max_accuracy_drop), "--out", str(out), *extra],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    wall = time.perf_counter() - t
    busy1, total1 = cpu_jiffies()
    if proc.returncode not in (0, 1):
        sys.exit(f"edgelm export --search failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(next(out.glob("*/report.json")).read_text())
    cands = report["search"]["candidates"]
    chosen = next(c for c in cands if c["status"] == "chosen")
    tried = [c for c in cands if c.get("seconds") is not None]
    return {
        "wall_s": wall,
        "cpu_utilisation": (busy1 - busy0) / max(total1 - total0, 1),
        "chosen": {k: chosen[k] for k in ("sparsity", "scheme", "float_layers", "label")},
        "tried": [{k: c[k] for k in ("label", "status", "seconds", "ran_on", "accuracy_drop")} for c in tried],
        "candidates_s": sum(c["seconds"] for c in tried),
    }


def projection(seq: dict, nodes: int) -> float:
    """Wall time with ``nodes`` one-CPU workers, from the sequential run's fixed part and candidate times."""
    times = [c["seconds"] for c in seq["tried"]]
    fixed = seq["wall_s"] - sum(times)
    k = len(times)  # the same candidates are tried up to the chosen one; a batch lasts as its slowest
    batches = [times[i : i + nodes] for i in range(0, k, nodes)]
    return fixed + sum(max(b) for b in batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=300, help="SST-2 dev sentences as the labeled data")
    p.add_argument("--max-accuracy-drop", type=float, default=0.3)
    args = p.parse_args()
    if not (CACHE / "ft-8000").is_dir():
        sys.exit("benchmarks/.cache/ft-8000 is missing: run benchmarks/compression_sst2.py first (it fine-tunes it)")
    work = Path(tempfile.mkdtemp(prefix="edgelm-search-scaling-"))
    rows = SST2.read_text(encoding="utf-8").splitlines()
    data = work / "dev.tsv"
    data.write_text("\n".join(rows[: args.limit + 1]) + "\n")
    profile = ROOT / "device_profiles" / "pixel8.toml"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth, "PYTHONPATH": str(ROOT)}
    runs = {}
    try:
        log("sequential search")
        runs["sequential"] = search(args, work / "seq", profile, data, [], env)
        for nodes in (1, 2):
            address, tmp = ray_cluster(nodes, env)
            try:
                log(f"search on Ray, {nodes} worker node(s)")
                runs[f"ray_{nodes}"] = search(args, work / f"ray{nodes}", profile, data, ["--ray", address], env)
            finally:
                ray_stop(env, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seq = runs["sequential"]
    same = all(r["chosen"] == seq["chosen"] for r in runs.values())
    payload = {
        "host": hostinfo.cpu_info(),
        "model": "all-MiniLM-L6-v2 fine-tuned on SST-2 (benchmarks/.cache/ft-8000)",
        "data": f"first {args.limit} SST-2 dev sentences",
        "max_accuracy_drop": args.max_accuracy_drop,
        "format": "onnx",
        "runs": runs,
        "same_choice": same,
        "projection_s": {n: projection(seq, n) for n in (1, 2, 4, 8, 16)},
    }
    lines = [
        "# The accuracy-budget search: sequential and on Ray",
        "",
        f"Host: {hostinfo.describe(payload['host'])}. Model: {payload['model']}; data: "
        f"{payload['data']}; ONNX, seq 128, no pruning, accuracy budget {args.max_accuracy_drop} points. Each "
        "search in its own process; Ray: a local cluster of 1-CPU nodes (`ray start`).",
        "",
        "| run | wall s | vs sequential | CPU use (all cores) | candidates tried | their time s | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name.replace('_', ' ')} | {r['wall_s']:.0f} | {seq['wall_s'] / r['wall_s']:.2f}x | "
            f"{r['cpu_utilisation']:.0%} | {len(r['tried'])} | {r['candidates_s']:.0f} | {r['chosen']['label']} |"
        )
    fixed = seq["wall_s"] - seq["candidates_s"]
    lines += [
        "",
        f"Same chosen candidate in every run: {'yes' if same else 'NO'}. The sequential run spent "
        f"{seq['candidates_s']:.0f} s of {seq['wall_s']:.0f} s in its {len(seq['tried'])} candidates; the rest "
        f"({fixed:.0f} s: loading, the fp32 reference, writing, the host check of the chosen artifact) does not "
        "parallelise. On Ray a candidate also pays its model's trip through the object store and a worker's "
        "first import of torch and the exporters, and runs at 1 thread.",
        "",
        "Projection with N one-CPU worker nodes (the fixed part plus the sequential run's candidates in batches "
        "of N, each batch as long as its slowest; no Ray overhead): "
        + ", ".join(f"N={n}: {t:.0f} s" for n, t in payload["projection_s"].items())
        + ". The search stops at the first batch holding a candidate that fits, so N beyond the number of "
        "candidates tried gains nothing.",
    ]
    md = write_results("search_scaling", payload, lines)
    log(f"wrote {md}")


if __name__ == "__main__":
    main()
