"""Benchmark: ONNX int8 by edgelm beside Optimum's, on the same SST-2 fine-tune of MiniLM-L6.

One run, on this host (CPU only):
1. the fine-tuned checkpoint of ``benchmarks/compression_sst2.py`` (the packaged all-MiniLM-L6-v2 fine-tuned on
   the first ``--train-limit`` SST-2 train rows; trained and cached in ``benchmarks/.cache/`` if missing);
2. Optimum in its own virtual environment (``benchmarks/.cache/optimum-venv``, created on first use:
   ``optimum-onnx`` pins an older transformers than edgelm's): ``optimum-cli export onnx`` (fp32) and
   ``optimum-cli onnxruntime quantize --avx2`` and ``--arm64`` (its default int8 configurations: per-tensor
   weights), and ``--avx2 --per_channel``;
3. edgelm's ONNX exporter: fp32, ``int8_dynamic`` (the default: per-token int8 activations), ``int8_static``
   and ``8da4w``; and the int8 alternatives that were measured to choose that default, built from edgelm's
   fp32 graph with ONNX Runtime's own quantizers: ``quantize_dynamic`` per channel (one activation scale
   per tensor; edgelm's default before), ``MatMulNBits`` with 8-bit weights and ``accuracy_level`` 4 (int8
   activations per block of 32), and dynamic int8 with the six layers kept float that were measured to be
   most sensitive (per layer, on 100 SST-2 train sentences outside the fine-tuning rows);
4. each artifact in its own process with onnxruntime only: SST-2 dev accuracy (872 sentences, batch 1, each
   at its real length), top-1 agreement with PyTorch eager fp32, size, and latency p50 at 1 and 2 threads
   (batch 1, seq 128), rounds interleaved (every artifact once per round) so that drift in the machine's
   speed hits all alike.

Results: ``benchmarks/results/peers_onnx.{json,md}``, naming the CPU and its int8 instruction-set features.

    python benchmarks/peers_onnx.py [--rounds 5] [--runs 30] [--train-limit 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
WARMUP = 10
#: What the Optimum environment installs (torch pinned to the CPU wheel edgelm uses).
OPTIMUM_PACKAGES = ("torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0")
#: Calibration rows for int8_static and the sensitivity measurement: SST-2 train rows far past the fine-tuning
#: subset (rows 20,000-20,199), never dev.
CALIBRATION_ROWS = (20_000, 20_200)
SENSITIVE_FLOAT = 6


# --------------------------------------------------------------------------------------------- worker side
def worker(args) -> None:
    """Run one artifact with onnxruntime only; write ``{"samples_ms", ...}`` (and logits) to ``args.out``."""
    import onnxruntime as ort

    data = np.load(args.data)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(args.worker, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def feeds(ids, mask):
        f = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:  # Optimum's BERT graph takes them; edgelm's wrapper does not
            f["token_type_ids"] = np.zeros_like(ids)
        return f

    result = {}
    if args.logits:
        out = []
        for i in range(len(data["ids"])):
            n = max(2, int(data["mask"][i].sum()))
            out.append(sess.run(None, feeds(data["ids"][i : i + 1, :n], data["mask"][i : i + 1, :n]))[0])
        np.save(args.logits, np.concatenate(out).astype(np.float32))
    f = feeds(data["latency_ids"], data["latency_mask"])
    for _ in range(WARMUP):
        sess.run(None, f)
    samples = []
    for _ in range(args.runs):
        t = time.perf_counter()
        sess.run(None, f)
        samples.append((time.perf_counter() - t) * 1e3)
    result["samples_ms"] = samples
    Path(args.out).write_text(json.dumps(result))


def measure(path: Path, data: Path, threads: int, runs: int, tmp: Path, logits: Path | None = None) -> list[float]:
    out = tmp / "worker.json"
    cmd = [sys.executable, __file__, "--worker", str(path), "--data", str(data), "--threads", str(threads)]
    cmd += ["--runs", str(runs), "--out", str(out)] + (["--logits", str(logits)] if logits else [])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.read_text())["samples_ms"]


# --------------------------------------------------------------------------------------------- Optimum side
def optimum_env() -> Path:
    """The Optimum virtual environment's bin folder (``benchmarks/.cache/optimum-venv``, created on first use)."""
    from compression_sst2 import CACHE, log

    venv = CACHE / "optimum-venv"
    bin_dir = venv / "bin"
    if not (bin_dir / "optimum-cli").is_file():
        log(f"creating {venv} with {', '.join(OPTIMUM_PACKAGES)} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", *OPTIMUM_PACKAGES], check=True)
    return bin_dir


def run_quiet(cmd: list[str]) -> None:
    """Run a peer tool's command; its output is shown only when it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def optimum_artifacts(checkpoint: Path, out: Path) -> tuple[dict[str, Path], dict[str, str]]:
    bin_dir = optimum_env()
    cli = str(bin_dir / "optimum-cli")
    fp32 = out / "optimum-fp32"
    run_quiet([cli, "export", "onnx", "--model", str(checkpoint), "--task", "text-classification", str(fp32)])
    arts = {"Optimum fp32": fp32 / "model.onnx"}
    for arch, extra in (("avx2", []), ("avx2", ["--per_channel"]), ("arm64", [])):
        d = out / f"optimum-{arch}{'-pc' if extra else ''}"
        run_quiet([cli, "onnxruntime", "quantize", "--onnx_model", str(fp32), f"--{arch}", *extra, "-o", str(d)])
        arts[f"Optimum int8 --{arch}{' --per_channel' if extra else ''}"] = d / "model_quantized.onnx"
    versions = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import importlib.metadata as m; print(*(f'{p}=' + m.version(p) for p in "
            "('optimum-onnx', 'optimum', 'transformers', 'onnxruntime', 'torch')))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return arts, dict(v.split("=", 1) for v in versions)


# --------------------------------------------------------------------------------------------- edgelm side
def edgelm_artifacts(model, ids, mask, calib, out: Path) -> tuple[dict[str, Path], list]:
    import torch

    import exporters
    from edgelm import schemes
    from edgelm.fsutil import captured_output

    ex = {"input_ids": torch.from_numpy(ids[:1]), "attention_mask": torch.from_numpy(mask[:1])}
    calibration = [{"input_ids": calib[0][i : i + 1], "attention_mask": calib[1][i : i + 1]} for i in range(64)]
    arts = {}
    for scheme in ("fp32", "int8_dynamic", "int8_static", "8da4w"):
        path = out / f"edgelm.{scheme}.onnx"
        with captured_output(out / "export.log"):
            exporters.get("onnx").export(
                model.module,
                ex,
                schemes.quant_spec(scheme),
                path,
                exporters.ExportOptions(output_name="logits", calibration=calibration),
            )
        arts[f"edgelm {scheme}"] = path
    sensitivity = alternatives(arts["edgelm fp32"], calib, out, arts)
    arts["edgelm int8_dynamic as uint8 x int8 (before)"] = signed_weights(arts["edgelm int8_dynamic"])
    return arts, sensitivity


def signed_weights(src: Path) -> Path:
    """The same per-token int8 graph with its weights stored int8 (uint8 x int8, ONNX Runtime's x86 fast path
    and edgelm's ONNX int8 before 2026-12): the same integers, so any difference from ``src`` is the kernel's
    (``vpmaddubsw`` saturating at 16 bits on x86 without VNNI)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    zero = numpy_helper.from_array(np.array(0, np.int8), "u8s8_zero_point")
    model.graph.initializer.append(zero)
    for node in model.graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits:
            w = inits[node.input[1]]
            w.CopyFrom(
                numpy_helper.from_array((numpy_helper.to_array(w).astype(np.int16) - 128).astype(np.int8), w.name)
            )
            node.input[3] = zero.name
    dst = src.with_name("edgelm.int8_dynamic.u8s8.onnx")
    onnx.save(model, str(dst))
    return dst


def alternatives(fp32: Path, calib, out: Path, arts: dict[str, Path]) -> list:
    """The measured int8 alternatives, from edgelm's fp32 graph (see the module docstring). Returns the
    per-layer sensitivity ranking: ``[(logit MSE when only this layer is int8, node, module path)]``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from exporters.onnx import _linear_nodes, _per_row_gather

    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    clean = out / "clean.onnx"
    onnx.save(model, str(clean))

    def with_row_embeddings(src: Path, dst: Path) -> Path:
        m = onnx.load(str(src))
        _per_row_gather(m)
        onnx.save(m, str(dst))
        return dst

    def dynamic(dst: Path, op_types: list[str], **kw) -> Path:
        """ONNX Runtime's quantize_dynamic (QInt8 weights per channel) of the fp32 graph into ``dst``."""
        quantize_dynamic(
            str(clean), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=op_types, **kw
        )
        return dst

    arts["ORT quantize_dynamic (per tensor)"] = dynamic(out / "ort-dynamic.onnx", ["MatMul", "Gemm", "Gather"])
    q = MatMulNBitsQuantizer(onnx.load(str(clean)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(out / "nbits8.tmp.onnx"), use_external_data_format=False)
    arts["MatMulNBits 8-bit, accuracy_level 4"] = with_row_embeddings(out / "nbits8.tmp.onnx", out / "nbits8.onnx")

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ids, mask = calib[0][:100], calib[1][:100]

    def logits(path: Path) -> np.ndarray:
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        rows = []
        for i in range(len(ids)):
            n = max(2, int(mask[i].sum()))
            rows.append(s.run(None, {"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]})[0])
        return np.concatenate(rows)

    ref = logits(clean)
    ranking = []  # ORT's dynamic quantization leaves Gemm (the pooler, the classifier) float: they rank last
    for node, module in _linear_nodes(model):
        one = dynamic(out / "one.onnx", ["MatMul"], nodes_to_quantize=[node])
        ranking.append((float(((logits(one) - ref) ** 2).mean()), node, module))
    ranking.sort(reverse=True)
    keep = dynamic(
        out / "keep.tmp.onnx", ["MatMul", "Gemm"], nodes_to_exclude=[n for _, n, _ in ranking[:SENSITIVE_FLOAT]]
    )
    name = f"quantize_dynamic, {SENSITIVE_FLOAT} most sensitive layers float"
    arts[name] = with_row_embeddings(keep, out / "keep.onnx")
    return ranking


# --------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per artifact, thread count and round")
    ap.add_argument("--train-limit", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from compression_sst2 import SST2, fine_tuned, log

    from edgelm import hostinfo
    from edgelm.data import TextDataset, encode, label_indices, load_dataset, load_tokenizer
    from edgelm.models import load_model
    from edgelm.pipeline import latency_input
    from exporters.base import trim_padding

    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}: this benchmark reads ../shared/data/sst2")
    host_before = hostinfo.cpu_info()
    checkpoint = fine_tuned(args.train_limit, args.epochs)
    model = load_model(checkpoint)
    tok = load_tokenizer(model.tokenizer_dir, SEQ)
    dev = load_dataset(SST2 / "dev.tsv")
    ids, mask = encode(tok, dev)
    labels = label_indices(dev.labels, model.labels)
    lo, hi = CALIBRATION_ROWS
    calib = encode(tok, TextDataset(texts=load_dataset(SST2 / "train.tsv", limit=hi).texts[lo:hi]))
    with torch.no_grad():
        ref = np.concatenate(
            [
                model.module(
                    *(
                        torch.from_numpy(v)
                        for v in trim_padding({"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}).values()
                    )
                ).numpy()
                for i in range(len(ids))
            ]
        )
    ref_acc = float((ref.argmax(1) == labels).mean() * 100)
    log(f"PyTorch eager fp32: accuracy {ref_acc:.2f}% on {len(ids)} dev sentences at their real lengths")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.npz"
        li, lm = latency_input(ids, mask, SEQ)
        np.savez(data, ids=ids, mask=mask, latency_ids=li, latency_mask=lm)
        log("exporting with Optimum (its own virtual environment)")
        opt_arts, opt_versions = optimum_artifacts(checkpoint, tmp)
        log("exporting with edgelm and building the measured alternatives")
        ed_arts, ranking = edgelm_artifacts(model, ids, mask, calib, tmp)
        arts = {**opt_arts, **ed_arts}
        rows = {}
        for name, path in arts.items():
            lg = tmp / "logits.npy"
            measure(path, data, 1, 1, tmp, logits=lg)
            out = np.load(lg)
            acc = float((out.argmax(1) == labels).mean() * 100)
            rows[name] = {
                "artifact": name,
                "by": name.split()[0] if name.split()[0] in ("Optimum", "edgelm") else "ONNX Runtime (alternative)",
                "size_mb": path.stat().st_size / 1e6,
                "accuracy": acc,
                "accuracy_drop": ref_acc - acc,
                "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                "exact_ties": int((out[:, 0] == out[:, 1]).sum()),
                "samples_ms": {"1": [], "2": []},
            }
            log(f"{name}: accuracy {acc:.2f}%, top-1 {rows[name]['top1_agreement']:.4f}")
        for r in range(args.rounds):
            for name, path in arts.items():
                for threads in (1, 2):
                    rows[name]["samples_ms"][str(threads)] += measure(path, data, threads, args.runs, tmp)
            log(f"latency round {r + 1}/{args.rounds} done")
    for row in rows.values():
        for t in ("1", "2"):
            row[f"p50_ms_{t}t"] = float(np.median(row["samples_ms"][t]))
        del row["samples_ms"]
    write(list(rows.values()), ref_acc, ranking, opt_versions, host_before, args)


def targets(rows: dict[str, dict]) -> list[dict]:
    """Issue 13's targets for edgelm's default ONNX int8 (``int8_dynamic``)."""
    e, avx2, arm = rows["edgelm int8_dynamic"], rows["Optimum int8 --avx2"], rows["Optimum int8 --arm64"]
    out = [
        {
            "target": "top-1 agreement with fp32 >= 0.99",
            "value": f"{e['top1_agreement']:.4f}",
            "met": e["top1_agreement"] >= 0.99,
        },
        {
            "target": "accuracy drop <= 0.3 points",
            "value": f"{e['accuracy_drop']:+.2f}",
            "met": e["accuracy_drop"] <= 0.3,
        },
        {
            "target": "size <= 1.0x Optimum's int8",
            "value": f"{e['size_mb'] / avx2['size_mb']:.3f}x",
            "met": e["size_mb"] <= avx2["size_mb"],
        },
    ]
    for name, peer in (("--avx2", avx2), ("--arm64", arm)):
        for t in ("1", "2"):
            ratio = e[f"p50_ms_{t}t"] / peer[f"p50_ms_{t}t"]
            out.append(
                {
                    "target": f"p50 <= 0.8x Optimum {name}, {t} thread(s), this host",
                    "value": f"{ratio:.2f}x",
                    "met": ratio <= 0.8,
                }
            )
    return out


def write(results, ref_acc, ranking, opt_versions, host_before, args) -> None:
    from _results import write_results
    from compression_sst2 import log

    from edgelm import hostinfo
    from edgelm.report import markdown_table

    rows = {r["artifact"]: r for r in results}
    base = rows["Optimum int8 --avx2"]
    for r in results:
        r["x_optimum_avx2_1t"] = round(r["p50_ms_1t"] / base["p50_ms_1t"], 2)
    tg = targets(rows)
    payload = {
        "benchmark": "peers_onnx",
        "host": hostinfo.run_record(host_before),  # CPU, int8 ISA features, load before/after
        "model": f"all-MiniLM-L6-v2 fine-tuned on the first {args.train_limit} SST-2 train rows",
        "dev": "SST-2 dev, 872 sentences, batch 1, each at its real length",
        "reference": {"framework": "PyTorch eager fp32", "accuracy": ref_acc},
        "latency": {
            "batch": 1,
            "seq_len": SEQ,
            "warmup": WARMUP,
            "runs_per_round": args.runs,
            "rounds": args.rounds,
            "threads": [1, 2],
            "interleaved": True,
        },
        "optimum": opt_versions,
        "sensitivity": [{"logit_mse": m, "node": n, "module": p} for m, n, p in ranking],
        "results": results,
        "targets": tg,
    }
    lines = [
        "# ONNX int8: edgelm beside Optimum (MiniLM-L6 fine-tuned on SST-2)",
        "",
        hostinfo.describe_run(payload["host"]),
        "",
        f"Accuracy on all 872 SST-2 dev sentences at their real lengths (batch 1); PyTorch eager fp32 "
        f"{ref_acc:.2f}%. Latency p50 at batch 1, seq {SEQ}, {args.rounds} interleaved rounds of {args.runs} runs "
        "after 10 warm-up, each artifact in its own process with onnxruntime only. Optimum "
        f"{opt_versions.get('optimum-onnx')} (transformers {opt_versions.get('transformers')}) in its own "
        "virtual environment.",
        "",
        *markdown_table(
            [
                {
                    "artifact": r["artifact"],
                    "size MB": f"{r['size_mb']:.2f}",
                    "dev acc %": f"{r['accuracy']:.2f}",
                    "drop (pts)": f"{r['accuracy_drop']:+.2f}",
                    "top-1 vs fp32": f"{r['top1_agreement']:.4f}",
                    "p50 ms 1 thread": f"{r['p50_ms_1t']:.2f}",
                    "p50 ms 2 threads": f"{r['p50_ms_2t']:.2f}",
                    "× Optimum --avx2 (1 thread)": f"{r['x_optimum_avx2_1t']:.2f}",
                }
                for r in results
            ]
        ),
        "",
        *markdown_table(
            [
                {"target (edgelm int8_dynamic)": t["target"], "value": t["value"], "met": "yes" if t["met"] else "no"}
                for t in tg
            ]
        ),
    ]
    top = ", ".join(f"{p.removeprefix('base.encoder.')}" for _, _, p in ranking[:SENSITIVE_FLOAT])
    lines += ["", f"Most sensitive layers (logit MSE with only that layer int8, 100 calibration sentences): {top}."]
    log(f"wrote {write_results('peers_onnx', payload, lines)}")


if __name__ == "__main__":
    main()
