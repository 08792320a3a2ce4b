"""Benchmark: compression that survives export, on SST-2, side by side with PyTorch eager fp32.

One run, on this host (CPU only):
1. fine-tune the packaged all-MiniLM-L6-v2 into an SST-2 classifier (`edgelm finetune`'s code) on the first
   ``--train-limit`` rows of ``../shared/data/sst2/train.tsv`` (default 8,000 of 67,349, seq 64);
2. prune 30% and 50% of the attention heads and FFN neurons with PLATON while distilling from the fine-tuned
   model (`edgelm compress --method platon --distill`), and 50% one-shot magnitude without retraining;
3. export: the fine-tuned model as fp32 and in every quantization scheme each format can do (int8 dynamic,
   int8 static, 8da4w / int4), the pruned models as int8 dynamic in every format;
4. measure each artifact in its own runtime in a fresh process (edgelm's host runner): SST-2 dev accuracy
   (872 sentences), size, and latency p50 at 1 thread, batch 1, seq 128 and seq 64 (20 runs after 5 warm-up),
   against PyTorch eager fp32 of the fine-tuned model on the same inputs.

Fine-tuned checkpoints are cached in ``benchmarks/.cache/`` (delete it to retrain). Results:
``benchmarks/results/compression_sst2.{json,md,png}``.

    python benchmarks/compression_sst2.py [--train-limit 8000] [--epochs 2] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import RESULTS, write_results

from edgelm import hostinfo

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
WARMUP, RUNS = 10, 50
SEQ = 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fine_tuned(train_limit: int, epochs: int) -> Path:
    """The packaged MiniLM fine-tuned on the first ``train_limit`` SST-2 train rows (cached; trained if missing)."""
    from edgelm.compress.jobs import run_finetune
    from edgelm.compress.train import TrainConfig

    path = CACHE / f"ft-{train_limit}"
    if not path.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        log("fine-tuning MiniLM on SST-2")
        r = run_finetune(
            "default",
            SST2 / "train.tsv",
            path,
            eval_data=SST2 / "dev.tsv",
            limit=train_limit,
            cfg=TrainConfig(epochs=epochs, lr=1e-4, batch_size=32, seq_len=64, seed=0),
        )
        log(f"fine-tuned: {[(e.epoch, e.eval_accuracy) for e in r.history]} in {r.seconds:.0f} s")
    return path


def train_models(args) -> dict[str, Path]:
    from edgelm.compress.jobs import run_compress
    from edgelm.compress.train import TrainConfig

    train, dev = SST2 / "train.tsv", SST2 / "dev.tsv"
    paths = {"fine-tuned": fine_tuned(args.train_limit, args.epochs)}
    for sparsity in (0.3, 0.5):
        name = f"pruned {int(sparsity * 100)}% + distill"
        paths[name] = CACHE / f"platon-distill-{int(sparsity * 100)}-{args.train_limit}-aligned32"
        if not paths[name].is_dir():
            log(f"PLATON pruning {sparsity:.0%} with distillation")
            r, s = run_compress(
                paths["fine-tuned"],
                train,
                paths[name],
                sparsity=sparsity,
                method="platon",
                distill=True,
                eval_data=dev,
                limit=args.train_limit,
                cfg=TrainConfig(epochs=args.prune_epochs, lr=1e-4, batch_size=32, seq_len=64),
            )
            log(f"{name}: {s['accuracy_before']:.2f} -> {s['accuracy_after']:.2f} in {r.seconds:.0f} s")
    paths["pruned 50% one-shot magnitude"] = CACHE / f"magnitude-50-{args.train_limit}-aligned32"
    if not paths["pruned 50% one-shot magnitude"].is_dir():
        run_compress(
            paths["fine-tuned"],
            train,
            paths["pruned 50% one-shot magnitude"],
            sparsity=0.5,
            method="magnitude",
            eval_data=dev,
            limit=200,
            cfg=TrainConfig(epochs=0),
        )
    return paths


def plan(paths: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(model name, format, scheme) rows to export."""
    rows = [("fine-tuned", f, "fp32") for f in ("onnx", "executorch", "tflite")]
    rows += [("fine-tuned", f, "int8_dynamic") for f in ("onnx", "executorch", "tflite")]
    rows += [("fine-tuned", f, "int8_static") for f in ("onnx", "executorch")]
    rows += [("fine-tuned", f, "8da4w") for f in ("onnx", "executorch", "tflite")]
    for name in paths:
        if name.startswith("pruned"):
            fmts = ("onnx", "executorch", "tflite") if "distill" in name else ("onnx",)
            rows += [(name, f, "int8_dynamic") for f in fmts]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-limit", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--prune-epochs", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true", help="re-draw the PNG from the JSON results")
    args = ap.parse_args()
    host_before = hostinfo.cpu_info()
    if args.plot_only:
        plot(json.loads((RESULTS / "compression_sst2.json").read_text())["results"])
        return
    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}: this benchmark reads ../shared/data/sst2")

    import torch

    import exporters
    from edgelm import schemes
    from edgelm.data import encode, label_indices, load_dataset, load_tokenizer
    from edgelm.fsutil import captured_output
    from edgelm.models import load_model
    from edgelm.pipeline import eager_latency_ms, latency_input
    from edgelm.validate.metrics import accuracy
    from edgelm.validate.runners import HostRunner

    paths = train_models(args)
    dev = load_dataset(SST2 / "dev.tsv")
    results = []
    runner = HostRunner()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        goldens, models, eager = {}, {}, {}
        for name, path in paths.items():
            m = load_model(path)
            models[name] = m
            tok = load_tokenizer(m.tokenizer_dir, SEQ)
            ids, mask = encode(tok, dev)
            labels = label_indices(dev.labels, m.labels)
            for seq in (SEQ, 64):
                li, lm = latency_input(ids, mask, seq)
                g = tmp / f"golden-{len(goldens)}.npz"
                rows = slice(None) if seq == SEQ else slice(0, 8)
                np.savez(
                    g, input_ids=ids[rows], attention_mask=mask[rows], latency_input_ids=li, latency_attention_mask=lm
                )
                goldens[(name, seq)] = g
                if name in ("fine-tuned",) or name.startswith("pruned"):
                    eager[(name, seq)] = eager_latency_ms(m, li, lm, 1)["p50_ms"]
            with torch.no_grad():
                logits = torch.cat(
                    [
                        m.module(torch.from_numpy(ids[i : i + 64]), torch.from_numpy(mask[i : i + 64]))
                        for i in range(0, len(ids), 64)
                    ]
                ).numpy()
            from edgelm.compress.pruning import structure_counts

            heads, ffn = structure_counts(m.module)
            results.append(
                {
                    "model": name,
                    "format": "pytorch eager",
                    "scheme": "fp32",
                    "accuracy": accuracy(logits, labels),
                    "size_mb": m.num_parameters * 4 / 1e6,
                    "p50_ms_seq128": eager[(name, SEQ)],
                    "p50_ms_seq64": eager[(name, 64)],
                    "parameters": m.num_parameters,
                    "heads_per_layer": heads,
                    "ffn_per_layer": ffn,
                }
            )
            models[name] = (m, labels)
            log(f"eager {name}: acc {results[-1]['accuracy']:.2f}, {eager[(name, SEQ)]:.2f} ms")
        for name, fmt, scheme in plan(paths):
            m, labels = models[name]
            quant = schemes.quant_spec(scheme)
            ex = {
                "input_ids": torch.ones(1, SEQ, dtype=torch.int64),
                "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
            }
            calib = None
            if schemes.get(scheme).needs_calibration:
                g = np.load(goldens[(name, SEQ)])
                calib = [
                    {"input_ids": g["input_ids"][i : i + 1], "attention_mask": g["attention_mask"][i : i + 1]}
                    for i in range(0, 256, 2)
                ]
            path = tmp / f"{name.split()[0]}-{len(results)}.{scheme}{exporters.suffix(fmt)}"
            t = time.perf_counter()
            with captured_output(tmp / "export.log"):
                exporters.get(fmt).export(
                    m.module, ex, quant, path, exporters.ExportOptions(output_name=m.output_name, calibration=calib)
                )
            export_s = time.perf_counter() - t
            run = runner.run_artifact(path, goldens[(name, SEQ)], threads=1, warmup=WARMUP, runs=RUNS)
            run64 = runner.run_artifact(path, goldens[(name, 64)], threads=1, warmup=WARMUP, runs=RUNS)
            acc = accuracy(run.outputs, labels)
            results.append(
                {
                    "model": name,
                    "format": fmt,
                    "scheme": scheme,
                    "accuracy": acc,
                    "size_mb": path.stat().st_size / 1e6,
                    "p50_ms_seq128": float(np.median(run.result["latency_samples_ms"])),
                    "p50_ms_seq64": float(np.median(run64.result["latency_samples_ms"])),
                    "export_s": export_s,
                }
            )
            log(
                f"{name} {fmt} {scheme}: acc {acc:.2f}, {results[-1]['size_mb']:.1f} MB, "
                f"{results[-1]['p50_ms_seq128']:.2f} ms"
            )
            path.unlink()
    write(results, args, eager, host_before)


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on this run's rows."""

    def row(model, fmt, scheme):
        return next((r for r in results if r["model"] == model and r["format"] == fmt and r["scheme"] == scheme), None)

    base = row("fine-tuned", "pytorch eager", "fp32")["accuracy"]
    out = []
    for fmt in ("onnx", "executorch", "tflite"):
        r = row("fine-tuned", fmt, "int8_dynamic")
        if r:
            out.append(
                {
                    "target": f"{fmt} int8 within 0.5 point of fp32",
                    "value": round(base - r["accuracy"], 2),
                    "met": base - r["accuracy"] <= 0.5,
                }
            )
        p = row("pruned 50% + distill", fmt, "int8_dynamic")
        if p and r:
            out.append(
                {
                    "target": f"{fmt} 50% pruned + distilled + int8 within 1.5 points",
                    "value": round(base - p["accuracy"], 2),
                    "met": base - p["accuracy"] <= 1.5,
                }
            )
            speed = r["p50_ms_seq128"] / p["p50_ms_seq128"]
            out.append(
                {
                    "target": f"{fmt} 50% pruned int8 >= 1.6x faster than unpruned int8 (seq 128)",
                    "value": round(speed, 2),
                    "met": speed >= 1.6,
                }
            )
    for fmt in ("onnx", "executorch"):
        r = row("fine-tuned", fmt, "int8_static")
        if r:
            out.append(
                {
                    "target": f"{fmt} static int8 within 1 point",
                    "value": round(base - r["accuracy"], 2),
                    "met": base - r["accuracy"] <= 1.0,
                }
            )
    return out


def plot(results: list[dict]) -> None:
    """Accuracy vs latency: colour = runtime, marker = model, one legend entry per (model, scheme)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pytorch eager": "black", "onnx": "tab:blue", "executorch": "tab:orange", "tflite": "tab:green"}
    markers = {
        "fine-tuned": "o",
        "pruned 30% + distill": "s",
        "pruned 50% + distill": "D",
        "pruned 50% one-shot magnitude": "x",
    }
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in results:
        ax.scatter(
            r["p50_ms_seq128"],
            r["accuracy"],
            c=colours.get(r["format"], "grey"),
            marker=markers.get(r["model"], "*"),
            s=45,
        )
        if r["scheme"] != "int8_dynamic" and r["format"] != "pytorch eager":
            ax.annotate(
                r["scheme"], (r["p50_ms_seq128"], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=f) for f, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=m, linestyle="", label=n) for n, m in markers.items()]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("latency p50, ms (1 thread, batch 1, seq 128, log scale); unlabeled points are int8_dynamic")
    ax.set_ylabel("SST-2 dev accuracy, %")
    ax.set_title("MiniLM-L6 on SST-2: accuracy vs latency per artifact")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "compression_sst2.png", dpi=120)


def write(results: list[dict], args, eager, host_before: dict) -> None:
    base = next(r for r in results if r["model"] == "fine-tuned" and r["format"] == "pytorch eager")
    for r in results:
        r["accuracy_drop"] = round(base["accuracy"] - r["accuracy"], 2)
        r["speedup_vs_eager_seq128"] = round(base["p50_ms_seq128"] / r["p50_ms_seq128"], 2)
        r["speedup_vs_eager_seq64"] = round(base["p50_ms_seq64"] / r["p50_ms_seq64"], 2)
    tg = targets(results)
    payload = {
        "benchmark": "compression_sst2",
        "host": hostinfo.run_record(host_before),  # CPU, int8 ISA features, load before/after
        "train_subset": f"first {args.train_limit} of 67,349 SST-2 train rows",
        "epochs": args.epochs,
        "prune_epochs": args.prune_epochs,
        "dev": "SST-2 dev, 872 sentences",
        "threads": 1,
        "warmup": WARMUP,
        "runs": RUNS,
        "results": results,
        "targets": tg,
    }
    lines = [
        "# Compression on SST-2 (MiniLM-L6, 1 thread, batch 1)",
        "",
        hostinfo.describe_run(payload["host"]),
        "",
        f"Fine-tuned on the first {args.train_limit} SST-2 train rows ({args.epochs} epochs, seq 64); "
        "accuracy on all 872 dev sentences; latency p50 over "
        f"{RUNS} runs after {WARMUP} warm-up, each artifact in its own runtime in a fresh process.",
        "",
        "| model | format | scheme | dev acc % | drop (pts) | size MB | p50 ms seq128 | p50 ms seq64 | × eager (128) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['scheme']} | {r['accuracy']:.2f} | {r['accuracy_drop']:+.2f} "
            f"| {r['size_mb']:.1f} | {r['p50_ms_seq128']:.2f} | {r['p50_ms_seq64']:.2f} | "
            f"{r['speedup_vs_eager_seq128']:.2f} |"
        )
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in tg]
    md = write_results("compression_sst2", payload, lines)
    plot(results)
    log(f"wrote {md}")


if __name__ == "__main__":
    main()
