"""Benchmark: few-shot adaptation of SmolLM2-135M-Instruct to AG News headline generation
(``edgelm adapt --model smollm2-135m --method prompt-tuning | scaled-prompt-tuning | lora``).

The task: the description of an AG News article is the source, its title the target
(``../shared/data/agnews/test.csv``, the only AG News file with the two apart). ``--eval-items`` pairs (500)
drawn once with a fixed seed are held out; the K training pairs of each seed are drawn from the rest.

Rows: prompt tuning, scaled prompt tuning and LoRA at K = ``--ks`` (16, 64, 256) over ``--seeds`` (0, 1, 2),
and the zero-shot instruct model given an instruction in its chat template. Each is scored by ROUGE-L F1
(``rouge-score``, stemming) of greedy generations (at most 32 tokens) on the held-out pairs, in PyTorch, and
with ``--pte`` also in the exported 8da4w ``.pte`` of seed 0 at K = ``--pte-k`` for ``--pte-methods`` (each
export in its own process: ``edgelm export --device pixel8 --format executorch``; the soft prompt inside the program).

Targets (issue 16): scaled prompt tuning ≥ prompt tuning at every K; the exported artifact within 1 ROUGE-L
point of PyTorch. Results: ``benchmarks/results/adaptation_generation.{json,md}``; adapted checkpoints and
scores are cached in ``benchmarks/.cache/``. The results JSON records every cell measured so far: a cell it
holds is not trained again when the cache is gone (a new checkout), unless ``--ignore-recorded``; its ``runs``
keep the recorded cells outside this run's ``--seeds`` / ``--ks`` / ``--methods``, and the table shows those asked.

    python benchmarks/adaptation_generation.py [--ks 16 64 256] [--seeds 0 1 2] [--eval-items 500] [--pte]
        [--cached-only]   (a table of the cells already measured)   [--ignore-recorded]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _results import RESULTS, write_results

from edgelm import hostinfo
from edgelm.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "adapt-gen"
AGNEWS = ROOT.parent / "shared" / "data" / "agnews" / "test.csv"
METHODS = ("prompt-tuning", "scaled-prompt-tuning", "lora")
HOLDOUT_SEED = 1234


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def split(eval_items: int) -> tuple[list, list]:
    """(training pool, held-out eval pairs) of AG News headline generation."""
    from edgelm.adapt.generation import load_pairs

    pairs = load_pairs(AGNEWS)
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(pairs))
    held = set(order[:eval_items].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def cached_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value


def recorded(eval_items: int) -> tuple[dict, dict | None]:
    """The cells an earlier run wrote to ``benchmarks/results/adaptation_generation.json``, keyed by
    (method, K, seed), each with the host it was measured on, and its zero-shot score; empty where the file
    is absent or scored another ``--eval-items``."""
    path = RESULTS / "adaptation_generation.json"
    prev = json.loads(path.read_text()) if path.is_file() else {}
    if prev.get("eval_items") != eval_items:
        return {}, None
    cells = {(r["method"], r["k"], r["seed"]): {"host": prev.get("host"), **r} for r in prev.get("runs", [])}
    return cells, prev.get("zero_shot")


def cell_dir(method: str, k: int, seed: int, pool: list) -> Path:
    """Where the adapted checkpoint of one cell and its scores are cached (the pool depends on --eval-items)."""
    return CACHE / f"{method}-k{k}-s{seed}-pool{len(pool)}"


def adapted(method: str, k: int, seed: int, pool: list) -> Path:
    from edgelm.adapt import generation as g

    out = cell_dir(method, k, seed, pool)
    if not (out / g.ADAPT_FILE).is_file():
        log(f"adapting: {method}, K = {k}, seed {seed}")
        g.run_adapt_generation("smollm2-135m", pool, out, g.GenAdaptConfig(method=method, shots=k, seed=seed))
    return out


def score_pytorch(ckpt: Path, evals: list, host: str) -> dict:
    """ROUGE-L of the adapted checkpoint in PyTorch (greedy), with the generation seconds."""
    from edgelm.adapt import generation as g
    from edgelm.causal_lm import load_causal_lm

    lm = load_causal_lm(ckpt)
    rec = g.read_adapt_record(ckpt)
    prompt = g.load_soft_prompt(ckpt, int(lm.config["hidden_size"])) if rec["method"] != "lora" else None
    cfg = g.GenAdaptConfig(**{k: v for k, v in rec["config"].items() if k in g.GenAdaptConfig.__dataclass_fields__})
    t0 = time.perf_counter()
    rouge, preds = g.evaluate(lm.model, lm.tokenizer, evals, cfg, lm.eos_ids[0], prompt)
    return {"rouge_l": rouge, "seconds": time.perf_counter() - t0, "examples": preds[:5], "host": host}


def score_zero_shot(evals: list) -> dict:
    """The instruct model with an instruction in its chat template, greedy."""
    from edgelm.adapt import generation as g
    from edgelm.causal_lm import load_causal_lm

    lm = load_causal_lm("smollm2-135m")
    sources = []
    for src, _ in evals:
        msg = [{"role": "user", "content": g.HEADLINE_INSTRUCTION + src}]
        ids = lm.tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
        sources.append([int(x) for x in (ids["input_ids"] if hasattr(ids, "keys") else ids)])
    news = g.generate_batch(lm.model, sources, 32, lm.eos_ids)
    preds = [lm.tokenizer.decode(new, skip_special_tokens=True).strip().strip('"') for new in news]
    return {"rouge_l": g.rouge_l(preds, [t for _, t in evals]), "examples": preds[:5]}


def pte_worker(pte: str, ckpt: str, eval_items: int) -> dict:
    """In its own process: ROUGE-L of the exported .pte, fed only the user's tokens (greedy)."""
    from edgelm import generation
    from edgelm.adapt import generation as g
    from edgelm.causal_lm import load_causal_lm
    from exporters.decoder import load_decoder

    _, evals = split(eval_items)
    tok = load_causal_lm(ckpt).tokenizer
    max_source = json.loads((Path(ckpt) / g.ADAPT_FILE).read_text())["config"]["max_source_tokens"]
    session = load_decoder(Path(pte), threads=2)
    eos = session.eos_ids[0] if session.eos_ids else tok.eos_token_id
    preds = []
    for src, _ in evals:
        ids = g.source_ids(tok, src, max_source)
        gen = generation.generate(session, ids, 32, eos_ids=[eos])
        preds.append(tok.decode([t for t in gen.tokens if t != eos], skip_special_tokens=True).strip())
    return {"rouge_l": g.rouge_l(preds, [t for _, t in evals]), "examples": preds[:5]}


def score_pte(ckpt: Path, eval_items: int) -> dict:
    out = CACHE / "dist" / ckpt.name
    bundle = out / "pixel8"
    if not (bundle / "manifest.json").is_file():
        log(f"exporting {ckpt.name} to an 8da4w .pte")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [shutil.which("edgelm") or "edgelm", "export", "--device", "pixel8", "--model", str(ckpt)]
        proc = subprocess.run([*cmd, "--format", "executorch", "--out", str(out)], capture_output=True, text=True)
        if not (bundle / "manifest.json").is_file():
            sys.exit(f"the export of {ckpt} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    art = json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["file"]
    cmd = [sys.executable, __file__, "--worker", str(bundle / art), "--ckpt", str(ckpt)]
    proc = subprocess.run([*cmd, "--eval-items", str(eval_items)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"scoring {bundle / art} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lora_delta(ckpt: Path) -> dict:
    """How far a merged LoRA moved the base's weights, in units of the GGUF's own 4-bit step (each block's
    scale d, from the base's :attr:`~edgelm.causal_lm.CausalLM.blocks`), over the projections: the median of
    |ΔW| / d (median over projections) and the share of weights that moved by more than half a step (those
    a 4-bit re-quantization of the merged weight can keep)."""
    from edgelm.causal_lm import load_causal_lm
    from edgelm.gguf_weights import BLOCK

    merged = load_causal_lm(ckpt).model.state_dict()
    ratios, moved = [], []
    for name, b in load_causal_lm("smollm2-135m").blocks.items():
        if name.endswith("proj.weight") and b.bits == 4:
            step = np.maximum(np.repeat(b.scales, BLOCK, axis=1), 1e-12)
            d = np.abs(merged[name].float().numpy() - b.dequantize()) / step
            ratios.append(float(np.median(d)))
            moved.append(float((d > 0.5).mean()))
    return {"median_delta_per_step": float(np.median(ratios)), "moved_half_step": float(np.mean(moved))}


def paired(runs: list, k: int, seed: int) -> tuple[float, float] | None:
    """(scaled prompt tuning, prompt tuning) ROUGE-L of one seed at K = k, or None where either was not run."""
    got = {r["method"]: r["rouge_l"] for r in runs if r["k"] == k and r["seed"] == seed}
    if "scaled-prompt-tuning" in got and "prompt-tuning" in got:
        return got["scaled-prompt-tuning"], got["prompt-tuning"]
    return None


def verdict(value: bool | str) -> str:
    """A target's word in the table: met / missed, or the count a per-seed row carries."""
    return value if isinstance(value, str) else ("met" if value else "missed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--eval-items", type=int, default=500)
    ap.add_argument("--pte", action="store_true", help="also score the exported .pte of seed 0 at --pte-k")
    ap.add_argument("--pte-k", type=int, default=64)
    ap.add_argument("--pte-methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods --pte exports")
    ap.add_argument("--cached-only", action="store_true", help="tabulate the cached cells only (no training)")
    ap.add_argument("--ignore-recorded", action="store_true", help="measure again the cells the results JSON holds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(pte_worker(args.worker, args.ckpt, args.eval_items)))
        return
    if not AGNEWS.is_file():
        sys.exit(f"AG News not found at {AGNEWS}: this benchmark reads ../shared/data/agnews/test.csv")
    load_before = os.getloadavg()[0]
    host = hostinfo.describe(hostinfo.cpu_info())
    pool, evals = split(args.eval_items)
    tag = f"n{args.eval_items}"
    log(f"{len(pool)} training pairs, {len(evals)} held out")
    earlier, zero = ({}, None) if args.ignore_recorded else recorded(len(evals))
    zero = zero or cached_json(CACHE / f"zero-shot-{tag}.json", lambda: score_zero_shot(evals))
    log(f"zero-shot instruct: ROUGE-L {zero['rouge_l']:.2f}")
    runs = []
    for seed in args.seeds:  # seed 0 of every cell first: a stopped run still has one of each
        for k in args.ks:
            for method in args.methods:
                want_pte = args.pte and seed == 0 and k == args.pte_k and method in args.pte_methods
                cached = (cell_dir(method, k, seed, pool) / f"score-pytorch-{tag}.json").is_file()
                old = earlier.pop((method, k, seed), None)
                if not cached and old and (not want_pte or "pte_rouge_l" in old or args.cached_only):
                    runs.append({key: v for key, v in old.items() if want_pte or key != "pte_rouge_l"})
                    log(f"{method} K={k} seed {seed}: ROUGE-L {old['rouge_l']:.2f} (recorded in the results)")
                    continue
                if args.cached_only and not cached:
                    continue  # a table of what was measured, without training the rest
                ckpt = adapted(method, k, seed, pool)
                res = cached_json(ckpt / f"score-pytorch-{tag}.json", lambda c=ckpt: score_pytorch(c, evals, host))
                rec = json.loads((ckpt / "edgelm_adapt.json").read_text())
                row = {"method": method, "k": k, "seed": seed, "rouge_l": res["rouge_l"], "train_s": rec["seconds"]}
                row["host"] = res.get("host", host)
                if want_pte:
                    pte = cached_json(ckpt / f"score-pte-{tag}.json", lambda c=ckpt: score_pte(c, args.eval_items))
                    row["pte_rouge_l"] = pte["rouge_l"]
                    if method == "lora":
                        row.update(cached_json(ckpt / "delta.json", lambda c=ckpt: lora_delta(c)))
                runs.append(row)
                log(f"{method} K={k} seed {seed}: ROUGE-L {res['rouge_l']:.2f}")
    table, summary = [], {}
    for method in args.methods:
        cells = {}
        for k in args.ks:
            vals = [r["rouge_l"] for r in runs if r["method"] == method and r["k"] == k]
            if not vals:
                cells[f"K = {k}"] = "not run"
                continue
            summary[f"{method}@{k}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
            cell = f"{np.mean(vals):.2f}" + (f" ± {np.std(vals):.2f}" if len(vals) > 1 else "")
            cells[f"K = {k}"] = cell + (
                f" ({len(vals)} of {len(args.seeds)} seeds)" if len(vals) < len(args.seeds) else ""
            )
        ptes = [r for r in runs if r["method"] == method and "pte_rouge_l" in r]
        cells[".pte (seed 0)"] = (
            f"{ptes[0]['pte_rouge_l']:.2f} vs {ptes[0]['rouge_l']:.2f} (K = {ptes[0]['k']})" if ptes else "–"
        )
        table.append({"method": method, **cells})
    table.append(
        {"method": "zero-shot instruct (instruction)", **{f"K = {k}": f"{zero['rouge_l']:.2f}" for k in args.ks}}
    )
    targets = {
        f"scaled >= plain at K = {k}": summary[f"scaled-prompt-tuning@{k}"]["mean"]
        >= summary[f"prompt-tuning@{k}"]["mean"]
        for k in args.ks
        if f"scaled-prompt-tuning@{k}" in summary and f"prompt-tuning@{k}" in summary
    }
    for k in args.ks:  # the same comparison seed by seed: a mean can hide one seed's swing
        pairs = [paired(runs, k, seed) for seed in args.seeds]
        pairs = [p for p in pairs if p is not None]
        if len(pairs) > 1:
            targets[f"scaled >= plain at K = {k}, seeds where it holds"] = (
                f"{sum(a >= b for a, b in pairs)} of {len(pairs)}"
            )
    for r in runs:
        if "pte_rouge_l" in r:
            targets[f"{r['method']} .pte within 1 point at K = {r['k']}"] = abs(r["pte_rouge_l"] - r["rouge_l"]) <= 1.0
    # read the recorded cells again: a run of other --seeds started beside this one may have written since
    mine = {(r["method"], r["k"], r["seed"]) for r in runs}
    latest = {} if args.ignore_recorded else recorded(len(evals))[0]
    others = {key: r for key, r in {**earlier, **latest}.items() if key not in mine}
    payload = {
        "host": host,
        "load_average": [load_before, os.getloadavg()[0]],
        "model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF, float32)",
        "task": "AG News headline generation (description -> title), test.csv",
        "eval_items": len(evals),
        "zero_shot": zero,
        "runs": runs + sorted(others.values(), key=lambda r: (r["seed"], r["k"], METHODS.index(r["method"]))),
        "summary": summary,
        "targets": targets,
    }
    md = [
        "# Few-shot adaptation of SmolLM2-135M-Instruct: AG News headline generation (ROUGE-L F1)",
        "",
        f"Host of this run: {host}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. "
        + "Cells measured on "
        + "; ".join(f"{h} ({n})" for h, n in Counter(r.get("host") or host for r in runs).items())
        + ". "
        f"{len(evals)} held-out pairs, greedy decoding, "
        + (f"mean ± std over seeds {args.seeds}." if len(args.seeds) > 1 else f"seed {args.seeds[0]}.")
        + " Cells are cached: the load average is this run's, not the training's.",
        "",
        *markdown_table(table),
        "",
        "Targets: " + ", ".join(f"{k}: {verdict(v)}" for k, v in targets.items()),
        "",
        *(
            f"Merged LoRA (K = {r['k']}, seed {r['seed']}) against the base's 4-bit step: median |ΔW| "
            f"{r['median_delta_per_step']:.3f} of a step, {100 * r['moved_half_step']:.3f} % of weights moved by "
            "more than half a step.\n"
            for r in runs
            if "median_delta_per_step" in r
        ),
        f"Reproduce: `python benchmarks/adaptation_generation.py {' '.join(sys.argv[1:])}`.",
    ]
    write_results("adaptation_generation", payload, md)
    log(f"wrote {RESULTS / 'adaptation_generation.md'}")


if __name__ == "__main__":
    main()
