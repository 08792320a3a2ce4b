"""Benchmark: hybrid RNN-Transformer students of SmolLM2-135M-Instruct (``edgelm compress --method hybrid-qrnn``)
with 0, 25, 50 and 75 % of the attention layers replaced by QRNN layers, side by side on this host.

Per level, in one run:
- the hybrid is trained as the CLI does (layer-local then end-to-end distillation on WikiText-2 *valid*;
  the layers chosen by the attention-drop importance measured once, on the 50 % run or the first share run,
  so every level replaces the cheapest layers of the same ranking); the 0 % level is the teacher (the
  dequantized GGUF as a Hugging Face checkpoint, exported the same way);
- WikiText-2 *test* perplexity in PyTorch fp32 over ``--ppl-windows`` windows of 1,024 tokens, and its ratio to
  the teacher's, overall and over the tokens predicted at positions 0-127, 128-511 and 512-1022 of the windows
  (a hybrid trained on short windows loses most where the replaced attention reached furthest back);
- ``edgelm export --device pixel8 --format executorch`` (8da4w ``.pte``, context ``--context``) in its own
  process, whose host check gives the ``.pte``'s perplexity on the golden window (512 tokens), its greedy token
  agreement with the PyTorch model it came from, and decode tokens/s;
- decode time per token at positions ``--positions`` (default 128, 512, 2048: the prompt is WikiText-2 test
  text fed up to that position, then 16 greedy decode steps, median ms), 1 thread, each ``.pte`` in its own
  process, with that process's peak RSS;
- KV cache + QRNN state for 2,048 positions (ExecuTorch's cache is float32,
  ``2 · layers · kv_heads · head_dim · positions · 4`` bytes per attention layer; a QRNN layer holds
  ``(D + (w − 1) · H) · 4`` bytes whatever the position).

Targets (issue 16) at 50 %: perplexity ≤ 1.10× the teacher's, decode time at position 2048 ≤ 0.75× the
all-attention model's, cache + state ≤ 0.55× its KV cache. Results:
``benchmarks/results/hybrid_qrnn.{json,md,png}``; trained hybrids and bundles are cached in
``benchmarks/.cache/``. With ``--seq-len`` / ``--batch-size`` other than the CLI's 128 tokens x 4 windows, the
hybrids are trained on those windows and the results go to ``hybrid_qrnn_w{seq_len}x{batch}.{json,md,png}``;
with ``--pytorch-only``, to ``hybrid_qrnn[_w{seq_len}x{batch}]_pytorch.{json,md}``.

    python benchmarks/hybrid_qrnn.py [--levels 0 0.25 0.5 0.75] [--local-steps 1000] [--e2e-steps 100]
        [--seq-len 128] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import RESULTS, write_results

from edgelm import hostinfo
from edgelm.compress.hybrid_qrnn import HybridConfig
from edgelm.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN_TEXT = DATA / "tokenized" / "wiki.valid.tokens"
TEST_TEXT = DATA / "raw" / "wiki.test.raw"
DECODE_STEPS = 16
#: The .pte's perplexity: over the first tokens of WikiText-2 test, beside PyTorch's on the same tokens (fed
#: one token per call: a .pte returns the last position's logits).
PTE_PPL_TOKENS = 512
#: Prompts are fed in chunks of this many tokens to every model (the hybrid's own chunk), so peak memory and
#: prefill compare like with like.
PREFILL_CHUNK = 64
#: Context spans (0-based positions of the predicting token) of the perplexity-by-position columns.
POSITION_SPANS = ((0, 128), (128, 512), (512, 1023))
TARGETS = {"perplexity_ratio": 1.10, "decode_ms_2048_ratio": 0.75, "memory_ratio": 0.55}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(level: float) -> int:
    return round(level * 100)


def teacher_dir() -> Path:
    """The teacher as a Hugging Face checkpoint (the 0 % level), written once."""
    from edgelm.causal_lm import load_causal_lm, save_hf_checkpoint

    out = CACHE / "hybrid-qrnn-teacher"
    if not (out / "config.json").is_file():
        log("writing the teacher checkpoint (dequantized SmolLM2-135M-Instruct)")
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf_checkpoint(load_causal_lm("smollm2-135m"), tmp)
        os.replace(tmp, out)
    return out


def train(level: float, layers: list[int] | None, args) -> Path:
    """The hybrid of ``level`` (cached): ``layers`` given (from an earlier level's importance) or measured."""
    from edgelm.compress import hybrid_qrnn as hq

    out = CACHE / f"hybrid-qrnn-{pct(level)}-{args.local_steps}-{args.e2e_steps}{window_tag(args)}"
    if (out / hq.CONFIG_FILE).is_file():
        cached = hq.read_hybrid_config(out)["replaced_layers"]
        if layers and sorted(cached) != sorted(layers):
            sys.exit(f"{out} holds a hybrid of layers {cached}, not {layers}: remove it to train those layers")
        return out
    log(f"training the {pct(level)} % hybrid ({'layers ' + str(layers) if layers else 'measuring the layers'})")
    last = [""]

    def progress(desc, done, total):
        if desc != last[0] or done == total or done % max(1, total // 10) == 0:
            log(f"  {desc} {done}/{total}")
            last[0] = desc

    cfg = HybridConfig(
        replace=layers or level,
        local_steps=args.local_steps,
        e2e_steps=args.e2e_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    res = hq.run_hybrid_qrnn("smollm2-135m", args.data, out, cfg, progress=progress)
    log(f"  layers {res.replaced_layers}: perplexity {res.teacher_perplexity:.2f} -> {res.hybrid_perplexity:.2f}")
    return out


def window_tag(args) -> str:
    """The cache and results suffix of a training window other than the CLI's default (128 tokens, 4 windows)
    and of training text other than WikiText-2 valid (the data sets' folder names under ``../shared/data``,
    e.g. ``-wikitext2+agnews+sst2``; a short hash of the paths for files elsewhere)."""
    same = (args.seq_len, args.batch_size) == (HybridConfig.seq_len, HybridConfig.batch_size)
    tag = "" if same else f"-w{args.seq_len}x{args.batch_size}"
    paths = [Path(p).resolve() for p in args.data]
    if paths == [TRAIN_TEXT.resolve()]:
        return tag
    root = DATA.parent.resolve()
    if all(p.is_relative_to(root) for p in paths):
        return tag + "-" + "+".join(p.relative_to(root).parts[0] for p in paths)
    return tag + "-d" + hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()[:8]


def data_names(args) -> str:
    """The training text in words, for the results' Markdown."""
    names = {"wiki.valid.tokens": "WikiText-2 valid", "test.csv": "AG News test descriptions"}
    names |= {"train.tsv": "SST-2 train sentences"} if any("sst2" in str(p) for p in args.data) else {}
    return " + ".join(names.get(Path(p).name, Path(p).name) for p in args.data)


def test_windows(tokenizer, n: int, length: int = 1024) -> np.ndarray:
    """The first ``n`` windows of ``length`` tokens of WikiText-2 test (the raw file, as the export reads it)."""
    ids = tokenizer(TEST_TEXT.read_text(encoding="utf-8")[:2_000_000], add_special_tokens=False)["input_ids"]
    n = min(n, len(ids) // length)
    return np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)


def pytorch_nll(model_dir: Path, *windows: np.ndarray) -> list[np.ndarray]:
    """Next-token NLL (nats) of the PyTorch fp32 model in ``model_dir`` (hybrid or not), loaded once, over each
    token-window array int64 [N, T]: float64 [N, T - 1] each."""
    from edgelm.causal_lm import load_causal_lm
    from edgelm.compress import hybrid_qrnn as hq

    if (model_dir / hq.CONFIG_FILE).is_file():
        model, _, _ = hq.load_hybrid(model_dir)
    else:
        model = load_causal_lm(model_dir).model
    return [hq.token_nll(model, w, batch_size=1) for w in windows]


def by_position(nll: np.ndarray, teacher_nll: np.ndarray) -> dict[str, float]:
    """Perplexity ratio to the teacher over each span of context positions (POSITION_SPANS, tokens predicted
    from that many tokens before them): where a hybrid loses what the replaced attention carried."""
    return {
        f"{a}-{b - 1}": float(np.exp(nll[:, a:b].mean() - teacher_nll[:, a:b].mean()))
        for a, b in POSITION_SPANS
        if a < nll.shape[1]
    }


def export(model_dir: Path, level: float, context: int) -> Path:
    """``edgelm export --format executorch`` in its own process (cached): the bundle folder."""
    out = CACHE / "hybrid-qrnn-dist" / f"{pct(level)}-{model_dir.name}-{context}"
    bundle = out / "pixel8"
    if (bundle / "validation.json").is_file():
        return bundle
    log(f"exporting the {pct(level)} % model to an 8da4w .pte (context {context})")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [shutil.which("edgelm") or "edgelm", "export", "--device", "pixel8", "--model", str(model_dir)]
    cmd += ["--format", "executorch", "--context-length", str(context), "--data", str(TEST_TEXT), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    log(f"  {time.perf_counter() - t0:.0f} s, exit {proc.returncode}")
    if not (bundle / "validation.json").is_file():
        sys.exit(f"the export of {model_dir} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return bundle


def worker(pte: str, positions: list[int], prompt_file: str) -> dict:
    """In its own process: the .pte's perplexity on the prompt's first tokens, decode ms per token at each
    position (1 thread) and the peak RSS."""
    import resource

    from edgelm import generation
    from exporters.decoder import load_decoder

    session = load_decoder(Path(pte), threads=1)
    session.max_seq = min(session.max_seq, PREFILL_CHUNK)  # every model's prompt in the same chunks
    prompt = np.load(prompt_file)
    ppl = generation.perplexity(session, prompt[:PTE_PPL_TOKENS])
    golden = np.load(Path(pte).parent / "golden.npz")  # greedy tokens against the PyTorch model's
    new = golden["reference_tokens"].shape[1]
    got = [generation.greedy_tokens(session, generation.unpad(p), new)[0] for p in golden["prompt_tokens"]]
    agreement = generation.token_agreement(golden["reference_tokens"], generation.pad_tokens(got, new))
    out = {}
    for p in positions:
        logits = session.forward(prompt[:p], 0)
        token, times = int(np.argmax(logits[-1])), []
        for k in range(DECODE_STEPS):
            t0 = time.perf_counter()
            logits = session.forward(np.asarray([token]), p + k)
            times.append((time.perf_counter() - t0) * 1000)
            token = int(np.argmax(logits[-1]))
        out[str(p)] = float(np.median(times))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"decode_ms": out, "peak_rss_mb": rss_mb, "perplexity": ppl, "agreement": agreement["agreement"]}


def measure_pte(model_dir: Path, level: float, args, prompt_file: Path, ppl_512: float) -> dict:
    """The level's .pte (exported once, cached) measured in its own process: the row's .pte fields."""
    bundle = export(model_dir, level, args.context)
    art = json.loads((bundle / "manifest.json").read_text())["artifacts"][0]
    log(f"{pct(level)} %: decode time at positions {args.positions}")
    speed = run_worker(bundle / art["file"], args.positions, prompt_file)
    return {
        "pte_perplexity_512": speed["perplexity"],
        "pte_perplexity_ratio_vs_own_reference": speed["perplexity"] / ppl_512,
        "pte_token_agreement_vs_own_reference": speed["agreement"],
        "pte_size_mb": art["size_bytes"] / 1e6,
        "export_seconds": art["export_seconds"],
        "decode_ms": speed["decode_ms"],
        "peak_rss_mb": speed["peak_rss_mb"],
    }


def run_worker(pte: Path, positions: list[int], prompt_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(pte), "--positions", *map(str, positions)]
    cmd += ["--prompt-file", str(prompt_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"measuring {pte} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_bytes(config: dict, attention_layers: int, qrnn: list[dict], positions: int) -> dict:
    """KV cache (float32, as ExecuTorch holds it) of the attention layers for ``positions`` tokens and the QRNN
    layers' state, bytes (the program allocates its cache for the whole context it was exported with)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    kv = 2 * attention_layers * kv_heads * head_dim * positions * 4
    state = sum((heads * head_dim + (q["window"] - 1) * int(config["hidden_size"])) * 4 for q in qrnn)
    return {"kv_cache_bytes": kv, "state_bytes": state, "total_bytes": kv + state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    ap.add_argument("--local-steps", type=int, default=1000)
    ap.add_argument("--e2e-steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=HybridConfig.seq_len, help="training window of the hybrids, tokens")
    ap.add_argument("--batch-size", type=int, default=HybridConfig.batch_size, help="training windows per step")
    ap.add_argument(
        "--layers",
        type=lambda v: [int(x) for x in v.split(",")],
        help="the first share level's layers, e.g. 3,4,5 (default: measured; the other levels take its ranking)",
    )
    ap.add_argument(
        "--pytorch-only",
        action="store_true",
        help="perplexity and cache memory only: no .pte export, no decode timing (minutes instead of an hour)",
    )
    ap.add_argument(
        "--data",
        nargs="+",
        default=[str(TRAIN_TEXT)],
        help="training text files, as the CLI's --data (default: WikiText-2 valid; never its test set)",
    )
    ap.add_argument("--positions", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--context", type=int, default=2080)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.positions, args.prompt_file)))
        return
    if not TEST_TEXT.is_file() or not TRAIN_TEXT.is_file():
        sys.exit(f"WikiText-2 not found under {DATA}: this benchmark reads ../shared/data/wikitext2")
    if max(args.positions) + DECODE_STEPS >= args.context:
        sys.exit(f"--context {args.context} must exceed the last position + {DECODE_STEPS} decode steps")
    from edgelm.causal_lm import load_causal_lm
    from edgelm.compress import hybrid_qrnn as hq

    load_before = os.getloadavg()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    teacher = load_causal_lm("smollm2-135m")
    n_layers = int(teacher.config["num_hidden_layers"])
    # the layer ranking: measured once by the first share level (50 % first when asked for)
    shares = sorted((x for x in args.levels if x > 0), key=lambda x: (x != 0.5, x))
    dirs: dict[float, Path] = {0.0: teacher_dir()} if 0.0 in args.levels else {}
    importance = None
    for level in shares:
        layers = hq.choose_layers(importance, level, n_layers) if importance else None
        if level == shares[0] and args.layers:
            layers = args.layers
        dirs[level] = train(level, layers, args)
        importance = importance or hq.read_hybrid_config(dirs[level])["importance_perplexity"]
    windows = test_windows(teacher.tokenizer, args.ppl_windows)
    prompt = test_windows(teacher.tokenizer, 1, max(args.positions) + 1)[0]
    prompt_file = CACHE / "hybrid-qrnn-prompt.npy"
    np.save(prompt_file, prompt)
    log(f"teacher perplexity on {windows.size} WikiText-2 test tokens (PyTorch fp32)")
    teacher_nll, teacher_nll_512 = pytorch_nll(teacher_dir(), windows, prompt[None, :PTE_PPL_TOKENS])
    teacher_ppl = float(np.exp(teacher_nll.mean()))
    rows = []
    for level in sorted(dirs):
        d = dirs[level]
        doc = hq.read_hybrid_config(d) if level > 0 else None
        qrnn = [{"layer": i, "window": doc["window"]} for i in doc["replaced_layers"]] if doc else []
        log(f"{pct(level)} %: perplexity")
        if level == 0:
            nll, nll_512 = teacher_nll, teacher_nll_512
        else:
            nll, nll_512 = pytorch_nll(d, windows, prompt[None, :PTE_PPL_TOKENS])
        ppl, ppl_512 = float(np.exp(nll.mean())), float(np.exp(nll_512.mean()))
        row = {
            "level": level,
            "replaced_layers": [q["layer"] for q in qrnn],
            "model": str(d),
            "training_seconds": doc.get("seconds") if doc else None,
            "perplexity": ppl,
            "perplexity_ratio": ppl / teacher_ppl,
            "perplexity_ratio_by_position": by_position(nll, teacher_nll),
            "perplexity_512": ppl_512,
            **cache_bytes(teacher.config, n_layers - len(qrnn), qrnn, 2048),
        }
        if not args.pytorch_only:
            row.update(measure_pte(d, level, args, prompt_file, ppl_512))
        rows.append(row)
        log(f"  ppl {ppl:.2f} ({ppl / teacher_ppl:.3f}x), decode ms {row.get('decode_ms', '(not measured)')}")
    base = next((r for r in rows if r["level"] == 0), None)
    for r in rows:
        if base:
            last = str(max(args.positions))
            r["memory_ratio"] = r["total_bytes"] / base["total_bytes"]
            if r["level"] == 0.5:
                r["targets"] = {
                    "perplexity_ratio": r["perplexity_ratio"] <= TARGETS["perplexity_ratio"],
                    "memory_ratio": r["memory_ratio"] <= TARGETS["memory_ratio"],
                }
            if "decode_ms" in r:
                r["decode_ms_ratio"] = {p: r["decode_ms"][p] / base["decode_ms"][p] for p in r["decode_ms"]}
                if r["level"] == 0.5:
                    ratio = r["decode_ms_ratio"].get(last, 9)
                    r["targets"]["decode_ms_2048_ratio"] = ratio <= TARGETS["decode_ms_2048_ratio"]
    host_info = hostinfo.describe(hostinfo.cpu_info())
    payload = {
        "host": host_info,
        "load_average": [load_before, os.getloadavg()[0]],
        "teacher": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF, float32)",
        "teacher_perplexity": teacher_ppl,
        "perplexity_tokens": int(windows.size),
        "positions": args.positions,
        "context": args.context,
        "local_steps": args.local_steps,
        "e2e_steps": args.e2e_steps,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "training_text": [str(Path(p).resolve()) for p in args.data],
        "targets_at_50": TARGETS,
        "rows": rows,
    }
    table = [table_row(r, n_layers, args.positions, args.pytorch_only) for r in rows]
    md = [
        "# Hybrid RNN-Transformer students of SmolLM2-135M-Instruct"
        + (" (PyTorch only)" if args.pytorch_only else " (8da4w .pte, 1 thread)"),
        "",
        f"Host: {host_info}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. "
        f"Perplexity: PyTorch fp32 over {windows.size:,} WikiText-2 test tokens (windows of 1,024)"
        + (
            "."
            if args.pytorch_only
            else f", and over its first {PTE_PPL_TOKENS} tokens beside the .pte's; .pte agreement: greedy tokens "
            "equal to the PyTorch model's on the export's 32 golden prompts. Decode: median of "
            f"{DECODE_STEPS} steps after a prompt of that many tokens."
        )
        + f" Training: {args.local_steps} layer-local + {args.e2e_steps} end-to-end steps of {args.batch_size} x "
        f"{args.seq_len}-token windows of {data_names(args)}. Ratio by position: the perplexity ratio to the teacher "
        "over the tokens predicted at those positions of the 1,024-token windows.",
        "",
        *markdown_table(table),
        "",
        f"Reproduce: `python benchmarks/hybrid_qrnn.py {' '.join(sys.argv[1:])}` (hybrids and bundles cached in "
        "`benchmarks/.cache/`).",
    ]
    name = "hybrid_qrnn" + window_tag(args).replace("-", "_") + ("_pytorch" if args.pytorch_only else "")
    write_results(name, payload, md)
    if not args.pytorch_only:
        plot(rows, args.positions, name)
    log(f"wrote {RESULTS / (name + '.md')}")


def table_row(r: dict, n_layers: int, positions: list[int], pytorch_only: bool) -> dict:
    """One level's Markdown row (the .pte columns left out with --pytorch-only)."""
    spans = r["perplexity_ratio_by_position"]
    row = {
        "replaced": f"{pct(r['level'])} % ({len(r['replaced_layers'])} of {n_layers})",
        "ppl (PyTorch)": f"{r['perplexity']:.2f} ({r['perplexity_ratio']:.3f}x)",
        "ratio by position " + " / ".join(spans): " / ".join(f"{v:.2f}" for v in spans.values()),
    }
    if not pytorch_only:
        row["ppl, 512 tok: PyTorch / .pte"] = f"{r['perplexity_512']:.2f} / {r['pte_perplexity_512']:.2f}"
        row[".pte agreement"] = f"{r['pte_token_agreement_vs_own_reference']:.2f}"
        row.update({f"decode ms @{p}": f"{r['decode_ms'][str(p)]:.1f}" for p in positions})
        ratio = r.get("decode_ms_ratio")
        row["vs 0 % @2048"] = f"{ratio[str(max(positions))]:.2f}x" if ratio else "–"
    mem = r.get("memory_ratio")
    row["KV + state MB @2048"] = f"{r['total_bytes'] / 1e6:.1f}" + (f" ({mem:.2f}x)" if mem is not None else "")
    if not pytorch_only:
        row[".pte MB"] = f"{r['pte_size_mb']:.0f}"
    return row


def plot(rows: list[dict], positions: list[int], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        ax[0].plot(positions, [r["decode_ms"][str(p)] for p in positions], marker="o", label=f"{pct(r['level'])} %")
    ax[0].set(xlabel="position (tokens)", ylabel="decode ms / token (1 thread)", xscale="log")
    ax[0].set_xticks(positions, [str(p) for p in positions])  # the measured positions, no 10^k labels
    ax[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax[0].legend(title="attention replaced")
    ax[1].bar([f"{pct(r['level'])} %" for r in rows], [r["perplexity"] for r in rows])
    ax[1].set(xlabel="attention replaced", ylabel="WikiText-2 test perplexity (PyTorch)")
    fig.tight_layout()
    tmp = RESULTS / f".{name}.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
