"""Why LiteRT's int8 SmolLM2 decoder misses the token-agreement gate: LiteRT's int8 arithmetic simulated in
PyTorch, one part of the model at a time.

A LiteRT conversion of SmolLM2-135M takes five minutes and each weight-only layer costs memory at load, so the
recipes are compared here in simulation on the same reference and golden prompts as ``edgelm export``
(the dequantized Q4_1 GGUF in float32; 32 chat-templated prompts, 32 greedy tokens each; perplexity over the
first 512 tokens of WikiText-2 test):

- weights: int8, symmetric, one scale per output channel (litert-torch's ``MIN_MAX`` / ``CHANNELWISE``), the
  embedding table per row (it is also the tied output head);
- dynamic-range layers: each input row quantized to int8 on the fly, asymmetric, one scale and zero point per
  row (XNNPACK's ``qd8`` fully-connected kernels, which LiteRT's dynamic-range ops run on), then the matmul;
- weight-only layers: int8 weights, float activations (litert-torch's ``WEIGHT_ONLY`` mode).

Rows: LiteRT's ``full_dynamic_recipe`` (every linear dynamic-range: what ``--quant tflite=int8_dynamic``
exports), every linear weight-only, attention or feed-forward weight-only per block (the granularity
litert-torch's ``GenerativeQuantRecipe`` offers), and SmoothQuant (Xiao et al. 2023, arXiv:2211.10438: per
channel scales s = max|x|^a / max|W|^(1-a), calibrated on 2,048 tokens of WikiText-2 *valid*, folded into the
preceding norm, up-projection or value projection, so the float model is unchanged) before the dynamic
recipe. The first two rows reproduce the real LiteRT exports' numbers (README).

    python benchmarks/litert_int8_sensitivity.py      # about 15 minutes on 2 cores

``--extra-prompts 96`` also scores every row on 96 SST-2 dev sentences (chat-templated, a one-sentence reply
asked for), so that a difference of one or two of the 32 golden prompts can be told from noise.

Results: ``benchmarks/results/litert_int8_sensitivity.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _results import write_results

from edgelm import hostinfo
from edgelm.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
TEST_TEXT = DATA / "raw" / "wiki.test.raw"
CALIB_TEXT = DATA / "tokenized" / "wiki.valid.tokens"
PPL_TOKENS = 512
CALIB_TOKENS = 2048
GATE = 0.15  # the profiles' token-agreement gate for text generation
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
#: The further prompts of ``--extra-prompts``: an SST-2 dev sentence after this request, in the chat template.
EXTRA_PROMPT = "Write one sentence in reply to this movie review: "


def sst2_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` SST-2 dev sentences drawn without replacement with ``seed`` (none for n = 0)."""
    if n <= 0:
        return []
    if not SST2_DEV.is_file():
        raise SystemExit(f"--extra-prompts reads {SST2_DEV}, which is not there")
    rows = [ln.split("\t")[0] for ln in SST2_DEV.read_text().splitlines()[1:] if ln.strip()]
    idx = np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)
    return [rows[i] for i in idx]


def quantize_weight(w):
    """int8 symmetric per output channel (rows of ``w`` float32 [out, in]), dequantized."""
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (w / s).round().clamp(-127, 127) * s


def quantize_rows(x):
    """int8 asymmetric per row (the last dimension), dequantized: XNNPACK's dynamic ``qd8`` inputs."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp_min(1e-12)
    zp = (-128 - lo / s).round()
    return ((x / s + zp).round().clamp(-128, 127) - zp) * s


class Simulation:
    """Forward hooks that make the model compute as a LiteRT int8 decoder would (see the module docstring)."""

    def __init__(self, model):
        import torch

        self.model, self.hooks, self.torch = model, [], torch
        self.linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def apply(self, weight_only: set[str]) -> None:
        F = self.torch.nn.functional
        self.clear()
        for name, mod in self.model.named_modules():
            if name in self.linears:
                w = quantize_weight(mod.weight.detach())
                dynamic = name not in weight_only

                def hook(m, args, out, w=w, dynamic=dynamic):
                    return F.linear(quantize_rows(args[0]) if dynamic else args[0], w)

                self.hooks.append(mod.register_forward_hook(hook))
        emb = self.model.get_input_embeddings()
        table = quantize_weight(emb.weight.detach())
        self.hooks.append(emb.register_forward_hook(lambda m, args, out: F.embedding(args[0], table)))

    def clear(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    ap.add_argument(
        "--extra-prompts",
        type=int,
        default=0,
        help="also score agreement on this many SST-2 dev sentences (chat-templated, a reply asked for)",
    )
    args = ap.parse_args()
    if not TEST_TEXT.is_file() or not CALIB_TEXT.is_file():
        raise SystemExit(f"WikiText-2 not found under {DATA}: this benchmark reads ../shared/data/wikitext2")
    import torch

    from edgelm import generative as gen
    from edgelm.causal_lm import load_causal_lm
    from edgelm.compress.hybrid_qrnn import perplexity as window_perplexity
    from edgelm.compress.smoothquant import calibration_rows, smooth
    from edgelm.generation import pad_tokens, token_agreement

    torch.set_num_threads(2)
    lm = load_causal_lm("smollm2-135m")
    prompts = [gen._prompt_ids(lm, p) for p in gen.PROMPTS]
    tok = lm.tokenizer
    test_ids = tok(TEST_TEXT.read_text()[:200_000], add_special_tokens=False)["input_ids"][:PPL_TOKENS]
    window = np.asarray(test_ids, dtype=np.int64)[None]
    calib_ids = tok(CALIB_TEXT.read_text()[:100_000], add_special_tokens=False)["input_ids"]
    calib = calibration_rows(calib_ids, CALIB_TOKENS)

    extra = [gen._prompt_ids(lm, EXTRA_PROMPT + s) for s in sst2_sentences(args.extra_prompts)]

    def greedy(which: list[list[int]] = prompts) -> np.ndarray:
        return pad_tokens([gen._eager_greedy(lm, p, gen.NEW_TOKENS)[0] for p in which], gen.NEW_TOKENS)

    def perplexity() -> float:
        return window_perplexity(lm.model, window, batch_size=1)

    reference, ref_ppl = greedy(), perplexity()
    extra_reference = greedy(extra) if extra else None
    sim = Simulation(lm.model)
    attention = {n for n in sim.linears if ".self_attn." in n}
    ffn = {n for n in sim.linears if ".mlp." in n}
    rows = [
        ("every linear dynamic-range (full_dynamic_recipe: --quant tflite=int8_dynamic)", set(), False),
        ("every linear weight-only", set(sim.linears), False),
        ("attention weight-only, feed-forward dynamic-range", attention, False),
        ("feed-forward weight-only, attention dynamic-range", ffn, False),
        (f"SmoothQuant (alpha {args.alpha:g}), then every linear dynamic-range", set(), True),
    ]
    results = []
    for label, weight_only, smoothed in rows:
        t0 = time.perf_counter()
        if smoothed:
            smooth(lm.model, calib, args.alpha)
        sim.apply(weight_only)
        agree = token_agreement(reference, greedy())
        agree_extra = token_agreement(extra_reference, greedy(extra)) if extra else None
        ppl = perplexity()
        sim.clear()
        results.append(
            {
                "recipe": label,
                "weight_only_linears": len(weight_only),
                "agreement": agree["agreement"],
                "prompts_equal": round(agree["agreement"] * agree["prompts"]),
                "mean_prefix": agree["mean_prefix"],
                "extra_prompts_equal": round(agree_extra["agreement"] * len(extra)) if extra else None,
                "extra_mean_prefix": agree_extra["mean_prefix"] if extra else None,
                "perplexity": ppl,
                "perplexity_ratio": ppl / ref_ppl,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"{label}: {results[-1]['prompts_equal']}/32, ppl {ppl / ref_ppl:.3f}x", flush=True)
    host = hostinfo.describe(hostinfo.cpu_info())
    payload = {
        "host": host,
        "reference_perplexity": ref_ppl,
        "gate": GATE,
        "alpha": args.alpha,
        "extra_prompts": len(extra),
        "rows": results,
    }
    table = [
        {
            "recipe (simulated)": r["recipe"],
            "prompts with all 32 tokens equal": f"{r['prompts_equal']} of 32 ({r['agreement']:.0%})",
            "tokens before the first difference": f"{r['mean_prefix']:.1f}",
            "perplexity (x reference)": f"{r['perplexity']:.2f} ({r['perplexity_ratio']:.3f}x)",
        }
        | (
            {
                f"{len(extra)} SST-2 prompts: all equal (first difference)": f"{r['extra_prompts_equal']} "
                f"({r['extra_mean_prefix']:.1f})"
            }
            if extra
            else {}
        )
        for r in results
    ]
    md = [
        "# LiteRT int8 on SmolLM2-135M-Instruct, simulated in PyTorch",
        "",
        f"Host: {host}. Reference: the dequantized Q4_1 GGUF in float32 (perplexity {ref_ppl:.2f} over the first "
        f"{PPL_TOKENS} tokens of WikiText-2 test); gate: {GATE:.0%} of the 32 golden prompts with all 32 greedy "
        "tokens equal. Weight-only layers are dequantized to float32 when LiteRT loads the model.",
        "",
        *markdown_table(table),
        "",
        "Reproduce: `python benchmarks/litert_int8_sensitivity.py"
        + (f" --extra-prompts {len(extra)}" if extra else "")
        + "`.",
    ]
    print(write_results("litert_int8_sensitivity", payload, md))


if __name__ == "__main__":
    main()
