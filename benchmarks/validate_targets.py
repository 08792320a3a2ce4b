"""Benchmark: one bundle validated on several targets, side by side (what `edgelm validate` reports).

One run, on this host (CPU only):
1. the SST-2 classifier fine-tuned from the packaged all-MiniLM-L6-v2 (``benchmarks/.cache/ft-8000``, made by
   ``benchmarks/compression_sst2.py``; fine-tuned here the same way if it is missing);
2. ``edgelm export --device pixel8`` with the SST-2 dev set (872 sentences) as the labeled golden set:
   ExecuTorch, TFLite and ONNX, int8 dynamic, seq 128;
3. ``edgelm validate`` on the host (x86-64) and under the arm64 emulator (qemu user mode, the profile's
   CPU model; ExecuTorch under emulation is opt-in and skipped here), with the first ``--eval-limit`` SST-2
   dev sentences also as ``--data``, so that the eval-set accuracy on the emulator is compared with the host's;
4. the side-by-side rows from ``validation.json`` (accuracy, top-1 agreement and cosine against PyTorch
   fp32, max error, difference from the host's outputs) and each runner's wall time.

Results: ``benchmarks/results/validate_targets.{json,md}``. Emulated latency is functional only.

    python benchmarks/validate_targets.py [--limit 872] [--eval-limit 200] [--keep DIR]
    python benchmarks/validate_targets.py --from-bundle DIR/pixel8     # only rewrite the tables from its validation.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

from edgelm import hostinfo

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def edgelm(*args: str) -> float:
    """Run the edgelm CLI; returns its wall time in seconds. Exits on failure (exit 1, a failed check, is kept)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"edgelm {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=872, help="SST-2 dev rows (all 872 by default)")
    p.add_argument("--eval-limit", type=int, default=200, help="SST-2 dev rows run again as the --data eval set")
    p.add_argument("--keep", type=Path, default=None, help="write the bundle here instead of a temp dir")
    p.add_argument("--from-bundle", type=Path, default=None, help="a bundle already validated: only write the tables")
    args = p.parse_args()
    host_before = hostinfo.cpu_info()
    if args.from_bundle:
        write_tables(json.loads((args.from_bundle / "validation.json").read_text()), args, None, host_before)
        return
    if not (SST2 / "dev.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}: this benchmark reads ../shared/data/sst2")
    model = CACHE / "ft-8000"
    if not model.is_dir():
        from edgelm.compress.jobs import run_finetune
        from edgelm.compress.train import TrainConfig

        log("fine-tuning MiniLM on 8,000 SST-2 training rows (as benchmarks/compression_sst2.py does)")
        run_finetune(
            "default",
            SST2 / "train.tsv",
            model,
            eval_data=SST2 / "dev.tsv",
            limit=8000,
            cfg=TrainConfig(epochs=2, lr=1e-4, batch_size=32, seq_len=64, seed=0),
        )
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as tmp:
        out = args.keep or Path(tmp)
        dev = str(SST2 / "dev.tsv")
        log("export pixel8")
        export_s = edgelm(
            "export",
            "--device",
            "pixel8",
            "--model",
            str(model),
            "--data",
            dev,
            "--limit",
            str(args.limit),
            "--out",
            str(out),
        )
        bundle = out / "pixel8"
        for runner in ("host", "emulator"):
            if runner == "emulator":
                edgelm("emulator", "setup")
            log(f"validate on {runner}")
            edgelm("validate", str(bundle), "--runner", runner, "--data", dev, "--limit", str(args.eval_limit))
        write_tables(json.loads((bundle / "validation.json").read_text()), args, export_s, host_before)


def write_tables(doc: dict, args, export_s: float | None, host_before: dict) -> None:
    """benchmarks/results/validate_targets.{json,md} from a bundle's validation.json."""
    from edgelm.report import markdown_table, side_by_side_rows

    rows = side_by_side_rows(doc)
    runners = {
        name: {
            k: r.get(k)
            for k in ("kind", "machine", "qemu_cpu", "threads", "warmup", "runs", "passed", "seconds", "eval_set")
        }
        for name, r in doc["runners"].items()
    }
    result = {
        "benchmark": "validate_targets",
        "device": "pixel8",
        "model": "all-MiniLM-L6-v2 fine-tuned on SST-2 (8,000 rows)",
        "golden_rows": args.limit,
        "eval_rows": args.eval_limit,
        "export_s": export_s,
        "host": hostinfo.run_record(host_before),
        "runners": runners,
        "rows": rows,
        "artifacts": {
            r: {
                a: {
                    k: v
                    for k, v in rec.items()
                    if k in ("status", "fidelity", "vs_host", "eval", "latency", "load_ms", "peak_rss_mb")
                }
                for a, rec in doc["runners"][r]["artifacts"].items()
            }
            for r in doc["runners"]
        },
    }
    md = [
        f"# One pixel8 bundle on the host and under arm64 emulation ({args.limit} SST-2 dev sentences)",
        "",
        "Reproduce: `python benchmarks/validate_targets.py`. Accuracy, top-1 and cosine are against PyTorch fp32 "
        "on the golden set; Δ vs host is the max |difference| from the same artifact's outputs on the host; "
        "eval acc is the `--data` set run on the target. Emulated latency is functional only.",
        "",
        hostinfo.describe_run(result["host"]),
        "",
        *markdown_table(rows),
    ]
    md += ["", "| runner | machine | qemu CPU | passed | seconds on the runner |", "|---|---|---|---|---|"]
    md += [
        f"| {n} | {r['machine']} | {r.get('qemu_cpu') or '–'} | {r['passed']} | {r['seconds']:.0f} |"
        for n, r in runners.items()
    ]
    write_results("validate_targets", result, md)
    log("wrote benchmarks/results/validate_targets.{json,md}")


if __name__ == "__main__":
    main()
