"""Benchmark: SmolLM2-135M-Instruct generation, side by side, on this host (CPU only).

Rows, each measured in its own process on the same prompts and threads:
- Hugging Face transformers eager fp32 (the dequantized GGUF, with transformers' KV cache): the baseline
  and the reference;
- edgelm's artifacts from a bundle of ``edgelm export --device pixel8 --model smollm2-135m`` (``.pte``, ONNX
  and LiteRT ``.tflite``, 8da4w), or from several bundles of the same model (``--bundle A B``: e.g. one
  exported with ``--format tflite`` beside an older one; their golden sets must be identical);
- llama.cpp through ``llama-cpp-python`` on the very same Q4_1 GGUF file (skipped, saying so, when it is not
  installed; it builds from source: ``pip install llama-cpp-python``).
- optimum-executorch's export of the same model (``--qlinear 8da4w --qembedding 8w --use_custom_sdpa
  --use_custom_kv_cache``, context 1,024) from the dequantized checkpoint. It pins transformers 5.0.0rc1, so it
  runs in its own virtual environment: ``python benchmarks/generation.py --export-optimum`` creates
  ``benchmarks/.cache/optimum-et-venv`` (torch 2.13.0, executorch 1.5.1, optimum-executorch 1.1.0) when it is
  missing, exports ``benchmarks/.cache/optimum-et/model.pte`` and records its export time; the row is skipped,
  saying so, while that file is missing.

Per row: perplexity over the bundle's golden window (the first 512 tokens of WikiText-2 test) and its ratio to
the reference's; greedy token agreement with the reference on the bundle's 32 golden prompts (32 new tokens);
prefill tokens/s (128-token prompt), decode tokens/s (128 new tokens) and time to first token at 1 and 2
threads. Results: ``benchmarks/results/generation.{json,md,png}`` (the PNG: decode tokens/s against perplexity
ratio), with the host's CPU and load.

    python benchmarks/generation.py [--export-optimum] [--bundle dist/pixel8 ...] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import RESULTS, write_results

from edgelm import generation, hostinfo
from edgelm.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class HFSession:
    """transformers eager with its cache, behind the DecoderSession interface (full logits)."""

    full_logits = True

    def __init__(self, threads: int):
        import torch

        from edgelm.causal_lm import load_causal_lm

        torch.set_num_threads(threads)
        self.torch, self.lm = torch, load_causal_lm("smollm2-135m")
        self.max_context, self.vocab_size = 2048, self.lm.vocab_size
        self.bos_id, self.eos_ids = self.lm.bos_id, self.lm.eos_ids
        self._past = None

    def forward(self, tokens, pos):
        torch = self.torch
        if pos == 0:
            self._past = None
        with torch.inference_mode():
            out = self.lm.model(torch.from_numpy(np.asarray(tokens))[None], cache=self._past, use_cache=True)
        self._past = out.cache
        return out.logits[0].float().numpy()


class LlamaCppSession:
    """llama.cpp (llama-cpp-python) on the GGUF file, behind the DecoderSession interface (full logits)."""

    full_logits = True

    def __init__(self, gguf: str, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False
        )
        self.max_context, self.vocab_size = 1024, self.llm.n_vocab()
        self.bos_id, self.eos_ids = self.llm.token_bos(), [self.llm.token_eos()]

    def forward(self, tokens, pos):
        if pos == 0:
            self.llm.reset()
        self.llm.n_tokens = pos
        self.llm.eval([int(t) for t in tokens])
        return np.asarray(self.llm.scores[pos : pos + len(tokens)], dtype=np.float32)


class OptimumSession:
    """An optimum-executorch ``.pte`` (``forward(input_ids [1, n], cache_position [n])``) in ExecuTorch's runtime,
    behind the DecoderSession interface (the last position's logits)."""

    full_logits = False

    def __init__(self, path: str, threads: int):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (custom SDPA and KV-cache kernels)

        from exporters.decoder import quiet_stderr
        from exporters.executorch import open_program

        with quiet_stderr():
            self.torch, program = open_program(Path(path), threads)
            meta = {n: program.load_method(n).execute([]) for n in program.method_names if n.startswith("get_")}
            self.method = program.load_method("forward")
        self.max_context = int(meta["get_max_seq_len"][0])
        self.vocab_size = int(meta["get_vocab_size"][0]) if "get_vocab_size" in meta else 0
        self.bos_id, self.eos_ids = None, []

    def forward(self, tokens, pos):
        torch = self.torch
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)[None, :])
        out = self.method.execute([ids, torch.arange(pos, pos + ids.shape[1], dtype=torch.long)])[0]
        logits = out.numpy().astype(np.float32, copy=True)
        return logits.reshape(-1, logits.shape[-1])[-1:]


OPTIMUM = ROOT / "benchmarks" / ".cache" / "optimum-et"
OPTIMUM_VENV = ROOT / "benchmarks" / ".cache" / "optimum-et-venv"


def export_optimum() -> None:
    """Export SmolLM2 with optimum-executorch in its own virtual environment (created when missing) to
    ``OPTIMUM/model.pte``; the export time goes to ``OPTIMUM/export.json``."""
    from edgelm.causal_lm import load_causal_lm, save_hf_checkpoint

    python = OPTIMUM_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {OPTIMUM_VENV} (torch 2.13.0, executorch 1.5.1, optimum-executorch 1.1.0)")
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
        pins = ["torch==2.13.0", "executorch==1.5.1", "torchao==0.18.0", "optimum-executorch==1.1.0"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    hf = OPTIMUM / "hf"
    if not (hf / "config.json").is_file():
        log("writing the dequantized SmolLM2 checkpoint")
        save_hf_checkpoint(load_causal_lm("smollm2-135m"), hf)
    log("optimum-cli export executorch (8da4w linears, 8-bit embeddings, custom SDPA and KV cache)")
    t0 = time.perf_counter()
    cli = OPTIMUM_VENV / "bin" / "optimum-cli"
    cmd = [str(cli), "export", "executorch", "--model", str(hf), "--task", "text-generation", "--recipe", "xnnpack"]
    cmd += ["--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w", "--qembedding", "8w"]
    cmd += ["--max_seq_len", "1024", "--output_dir", str(OPTIMUM)]
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    (OPTIMUM / "export.json").write_text(json.dumps({"seconds": seconds, "command": cmd[1:]}, indent=2) + "\n")
    log(f"exported {OPTIMUM / 'model.pte'} in {seconds:.0f} s")


def worker(kind: str, path: str, threads: int, golden: str, quality: bool) -> dict:
    """One row at one thread count, in this process."""
    g = np.load(golden)
    t0 = time.perf_counter()
    if kind == "eager":
        session = HFSession(threads)
    elif kind == "llama.cpp":
        session = LlamaCppSession(path, threads)
    elif kind == "optimum":
        session = OptimumSession(path, threads)
    else:
        from exporters.decoder import load_decoder

        session = load_decoder(Path(path), threads=threads)
    out = {"kind": kind, "path": path, "threads": threads, "load_s": time.perf_counter() - t0}
    if quality:
        out["perplexity"] = generation.perplexity(session, g["perplexity_tokens"])
        rows = [generation.greedy_tokens(session, generation.unpad(r), 32)[0] for r in g["prompt_tokens"]]
        out["agreement"] = generation.token_agreement(g["reference_tokens"], generation.pad_tokens(rows, 32))
    prompt = [int(x) for x in g["speed_prompt"]]
    generation.speed(session, prompt[:16], 8)  # warm-up
    sp = generation.speed(session, prompt, NEW_TOKENS)
    sp.pop("step_ms")
    out["speed"] = sp
    return out


def run_worker(kind: str, path: str, threads: int, golden: Path, quality: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--path",
        path,
        "--threads",
        str(threads),
        "--golden",
        str(golden),
    ]
    if quality:
        cmd.append("--quality")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"kind": kind, "path": path, "threads": threads, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, nargs="+", default=[ROOT / "dist" / "pixel8"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker")
    ap.add_argument("--path", default="")
    ap.add_argument("--golden", default="")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--export-optimum", action="store_true", help="export the optimum-executorch row's .pte first")
    a = ap.parse_args()
    if a.export_optimum:
        export_optimum()
    if a.worker:
        print(json.dumps(worker(a.worker, a.path, a.threads[0], a.golden, a.quality)))
        return
    manifests = []
    for b in a.bundle:
        if not (b / "manifest.json").is_file():
            sys.exit(f"no bundle at {b}: run `edgelm export --device pixel8 --model smollm2-135m` first")
        manifests.append((b, json.loads((b / "manifest.json").read_text())))
    first = np.load(a.bundle[0] / "golden.npz")
    for b in a.bundle[1:]:
        other = np.load(b / "golden.npz")
        if any(
            not np.array_equal(first[k], other[k]) for k in ("prompt_tokens", "reference_tokens", "perplexity_tokens")
        ):
            sys.exit(f"{b}'s golden prompts or reference tokens differ from {a.bundle[0]}'s: export the same model")
    manifest = manifests[0][1]
    golden = a.bundle[0] / "golden.npz"
    ref_ppl = float(first["reference_perplexity"])
    from edgelm.causal_lm import packaged_gguf

    gguf = str(packaged_gguf("smollm2-135m"))
    rows = [("transformers eager fp32", "eager", "", manifest["model"]["parameters"] * 4)]
    artifacts = {x["file"]: (b, x) for b, m in manifests for x in m["artifacts"]}  # a later bundle's file wins
    rows += [(f"edgelm {f}", "edgelm", str(b / f), x["size_bytes"]) for f, (b, x) in artifacts.items()]
    export_s = {f"edgelm {f}": x.get("export_seconds") for f, (_, x) in artifacts.items()}
    if (OPTIMUM / "export.json").is_file():
        export_s["optimum-executorch 8da4w .pte"] = json.loads((OPTIMUM / "export.json").read_text())["seconds"]
    try:
        import llama_cpp  # noqa: F401

        rows.append(("llama.cpp Q4_1 GGUF", "llama.cpp", gguf, Path(gguf).stat().st_size))
    except ImportError:
        log("llama-cpp-python is not installed: the llama.cpp row is skipped")
    if (OPTIMUM / "model.pte").is_file():
        rows.append(
            (
                "optimum-executorch 8da4w .pte",
                "optimum",
                str(OPTIMUM / "model.pte"),
                (OPTIMUM / "model.pte").stat().st_size,
            )
        )
    else:
        log(f"no {OPTIMUM / 'model.pte'}: the optimum-executorch row is skipped (run with --export-optimum)")
    host_before = hostinfo.cpu_info()
    results = []
    for label, kind, path, size in rows:
        for i, t in enumerate(sorted(a.threads, reverse=True)):
            log(f"{label} at {t} thread(s)")
            r = run_worker(kind, path, t, golden, quality=(i == 0))
            r.update(label=label, size_mb=size / 1e6)
            results.append(r)
    host = hostinfo.run_record(host_before)
    eager = {r["threads"]: r["speed"]["decode_tokens_per_s"] for r in results if r["kind"] == "eager" and "speed" in r}
    quality = {r["label"]: r for r in results if "perplexity" in r}
    table = []
    for r in results:
        q = quality.get(r["label"], {})
        sp = r.get("speed", {})
        table.append(
            {
                "row": r["label"],
                "threads": str(r["threads"]),
                "size MB": f"{r['size_mb']:.1f}",
                "perplexity (x ref.)": f"{q['perplexity']:.2f} ({q['perplexity'] / ref_ppl:.3f})" if q else "–",
                "agreement (prefix)": f"{q['agreement']['agreement']:.2f} ({q['agreement']['mean_prefix']:.1f})"
                if q
                else "–",
                "prefill tok/s": f"{sp['prefill_tokens_per_s']:.0f}" if sp else r.get("error", "–"),
                "decode tok/s": f"{sp['decode_tokens_per_s']:.1f}" if sp else "–",
                "x eager": f"{sp['decode_tokens_per_s'] / eager[r['threads']]:.1f}"
                if sp and r["threads"] in eager
                else "–",
                "TTFT ms": f"{sp['ttft_ms']:.0f}" if sp else "–",
                "export s": f"{export_s[r['label']]:.0f}" if export_s.get(r["label"]) else "–",
            }
        )
    payload = {
        "host": host,
        "reference_perplexity": ref_ppl,
        "new_tokens": NEW_TOKENS,
        "export_seconds": export_s,
        "rows": results,
    }
    lines = [
        "# SmolLM2-135M-Instruct generation on this host",
        "",
        hostinfo.describe_run(host),
        f"Reference perplexity {ref_ppl:.3f} (transformers eager fp32 of the dequantized GGUF, first 512 tokens of "
        "WikiText-2 test); agreement: share of 32 golden prompts whose 32 greedy tokens equal the reference's "
        f"(mean tokens before the first difference); speed: 128-token prompt, {NEW_TOKENS} new tokens.",
        "",
        *markdown_table(table),
        "",
        "Reproduce: `edgelm export --device pixel8 --model smollm2-135m --format executorch,onnx,tflite && python "
        "benchmarks/generation.py` (or bundles exported apart: `--bundle dist/pixel8 other/pixel8`).",
        "",
    ]
    md = write_results("generation", payload, lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        q = quality.get(r["label"])
        if q and "speed" in r:
            ax.scatter(
                q["perplexity"] / ref_ppl, r["speed"]["decode_tokens_per_s"], label=f"{r['label']} ({r['threads']}t)"
            )
    ax.set_xlabel("perplexity / reference")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / "generation.png", dpi=120)
    log(f"wrote {md}")


if __name__ == "__main__":
    main()
