"""The text-generation pipeline: ``edgelm export --device D --model smollm2-135m``.

Stages (each returns plain values): load the model as the float32 reference (:mod:`edgelm.causal_lm`) ->
reference (greedy tokens and first-token logits for the golden prompts, perplexity over a fixed text
window, PyTorch eager speed) -> export each decoder artifact (:mod:`exporters.decoder`) -> write the golden
set and manifest -> check every artifact in its own process on this host, through the same path as ``edgelm
validate --runner host`` -> report. Everything is written into a temp folder and renamed into place.

The golden prompts (:data:`PROMPTS`, 32) are chat-templated when the model has a template; the reference is
greedy decoding of :data:`NEW_TOKENS` tokens in PyTorch eager fp32. Perplexity is measured over the first
:data:`PERPLEXITY_TOKENS` tokens (fewer if the context is shorter) of a text file: ``--data`` if given, else
WikiText-2's test split (``wiki.test.raw``) from ``$EDGELM_DATA`` or ``../shared/data/wikitext2/raw``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import edgelm
import exporters
from edgelm import fsutil, generation, hostinfo, tasks
from edgelm.bundle import SCHEMA, Bundle, Manifest
from edgelm.causal_lm import (
    CausalLM,
    executorch_blocks,
    executorch_checkpoint,
    load_causal_lm,
    save_hf_checkpoint,
)
from edgelm.compress.estimate import decoder_estimate, decoder_weight_bytes
from edgelm.data import default_text
from edgelm.errors import DataError, ExportError, RecipeError
from edgelm.generation import PROMPTS
from edgelm.recipe import GenerationRecipe
from edgelm.report import fmt, markdown_table
from edgelm.validate.host import HostRunner
from edgelm.validate.tokenizer_parity import check_tokenizers, summary_lines, write_check
from exporters import decoder, decoder_tflite
from exporters.base import ExporterError, sha256_file

ProgressFn = Callable[[str, int, int], None]

#: Greedy tokens per golden prompt.
NEW_TOKENS = 32
#: Tokens in the perplexity window (capped at the context length).
PERPLEXITY_TOKENS = 512
#: SmoothQuant's calibration (LiteRT int8 decoders): at most this many tokens of the perplexity text after the window.
CALIBRATION_TOKENS = 2048
#: The speed measurement: a prompt of this many tokens (from the perplexity text) and new tokens decoded.
SPEED_PROMPT_TOKENS = 128
SPEED_NEW_TOKENS = 128
WARMUP_STEPS, TIMED_STEPS = 5, 20
#: A hybrid RNN-Transformer's longest call in ExecuTorch (tokens): its QRNN layers' closed-form scan holds
#: [T, T, D] floats per call, so prompts are fed in chunks of this size (ExecuTorch's LLM runner splits them).
HYBRID_PREFILL_CHUNK = 64


@dataclass
class Reference:
    """The reference's golden values (PyTorch eager fp32)."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    next_logits: np.ndarray
    window: np.ndarray
    perplexity: float | None
    text_source: str | None
    speed_prompt: list[int]
    eager: dict = field(default_factory=dict)
    #: The perplexity text's tokens after the window: SmoothQuant's calibration (:func:`_calibration`).
    after_window: list[int] = field(default_factory=list, repr=False)


def _prompt_ids(lm: CausalLM, text: str) -> list[int]:
    tok = lm.tokenizer
    if lm.chat_template:
        enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return [int(x) for x in ids]
    return [int(x) for x in tok(text)["input_ids"]]


def _prompt_text(lm: CausalLM, text: str) -> str:
    """The golden prompt as the model sees it: chat-templated when the model has a template."""
    if lm.chat_template:
        return lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return text


def _eager_greedy(lm: CausalLM, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding in PyTorch eager with transformers' cache: (tokens, first-token logits)."""
    import torch

    eos = set(lm.eos_ids)
    with torch.inference_mode():
        out = lm.model(torch.tensor([prompt]), use_cache=True)
        logits, past = out.logits[0, -1], out.cache
        first = logits.float().numpy().copy()
        tokens: list[int] = []
        while True:
            t = int(torch.argmax(logits))
            tokens.append(t)
            if t in eos or len(tokens) >= n:
                break
            out = lm.model(torch.tensor([[t]]), cache=past, use_cache=True)
            logits, past = out.logits[0, -1], out.cache
        return tokens, first


def reference_stage(
    lm: CausalLM, recipe: GenerationRecipe, text: Path | None, threads: int, speed: bool = True
) -> Reference:
    """Greedy reference tokens and first-token logits for :data:`PROMPTS`, perplexity over the text window,
    and PyTorch eager speed (prefill of :data:`SPEED_PROMPT_TOKENS`, decode of :data:`SPEED_NEW_TOKENS`;
    ``speed=False``: not measured, ``eager`` left empty)."""
    import torch

    torch.set_num_threads(threads)
    prompts = [_prompt_ids(lm, p) for p in PROMPTS]
    too_long = max(len(p) for p in prompts) + NEW_TOKENS
    if too_long > recipe.context_length:
        raise ExportError(
            f"the golden prompts need {too_long} positions and the context is {recipe.context_length}: "
            f"use --context-length {too_long} or more"
        )
    rows, first = [], []
    for p in prompts:
        toks, logits = _eager_greedy(lm, p, NEW_TOKENS)
        rows.append(toks)
        first.append(logits)
    body = ""
    if text is not None:
        try:
            body = Path(text).read_text(encoding="utf-8", errors="replace")[:200_000]
        except OSError as exc:
            raise DataError(f"cannot read the perplexity text {text}: {exc.strerror}") from None
    ids = [int(x) for x in lm.tokenizer(body, add_special_tokens=False)["input_ids"]] if body.strip() else []
    n = min(PERPLEXITY_TOKENS, recipe.context_length)
    if text is not None and len(ids) < 2:
        raise DataError(f"the perplexity text {text} holds no text: pass a plain-text file with --data")
    window = np.asarray(ids[:n], dtype=np.int64)
    ppl = None
    if len(window) > 1:
        with torch.inference_mode():
            logits = lm.model(torch.from_numpy(window)[None]).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        ppl = float(torch.exp(-logp[torch.arange(len(window) - 1), torch.from_numpy(window[1:])].mean()))
    filler = ids or [int(x) for p in prompts for x in p]
    speed_prompt = (filler * (SPEED_PROMPT_TOKENS // max(len(filler), 1) + 1))[:SPEED_PROMPT_TOKENS]
    speed_prompt = speed_prompt[: max(2, recipe.context_length - SPEED_NEW_TOKENS - 1)]
    eager = _eager_speed(lm, speed_prompt, recipe.context_length, threads) if speed else {}
    return Reference(
        prompts,
        rows,
        np.stack(first).astype(np.float32),
        window,
        ppl,
        str(text) if text else None,
        speed_prompt,
        eager,
        ids[n : n + CALIBRATION_TOKENS],
    )


def _calibration(lm: CausalLM, after: list[int], text: Path | str | None) -> tuple[list[np.ndarray], str]:
    """SmoothQuant's calibration rows (int64 [T] each): up to :data:`CALIBRATION_TOKENS` of the perplexity text
    that follow the perplexity window (disjoint from what perplexity is measured on), in rows of 512; without
    512 such tokens, 512 tokens the model samples itself from its BOS (temperature 1, seed 0: the data-free
    calibration of LLM-QAT, Liu et al. 2023, arXiv:2305.17888), never the golden prompts the gates check."""
    from edgelm.compress.smoothquant import CALIBRATION_ROW_TOKENS, calibration_rows

    if len(after) >= CALIBRATION_ROW_TOKENS:
        rows = calibration_rows(after, CALIBRATION_TOKENS)
        return list(rows), f"{rows.size} tokens of {Path(str(text)).name} after the perplexity window"
    import torch

    start = lm.bos_id if lm.bos_id is not None else (lm.eos_ids or [0])[0]
    torch.manual_seed(0)
    with torch.inference_mode():
        out = lm.model.generate(
            torch.tensor([[start]]),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=CALIBRATION_ROW_TOKENS - 1,
            min_new_tokens=CALIBRATION_ROW_TOKENS - 1,
            pad_token_id=start,
        )
    why = "no perplexity text" if text is None else f"{Path(str(text)).name} is too short"
    return [out[0].numpy().astype(np.int64)], f"{out.shape[1]} tokens sampled from the model ({why})"


def _smoothed_checkpoint(lm: CausalLM, ref: Reference, alpha: float, directory: Path) -> dict:
    """Write a copy of ``lm`` with SmoothQuant's rescaling (alpha ``alpha``, calibrated on the perplexity text
    after its window: :func:`_calibration`) as a float32 Hugging Face checkpoint in ``directory``; returns what the manifest
    records of it."""
    from edgelm.compress.smoothquant import smooth

    calibration, source = _calibration(lm, ref.after_window, ref.text_source)
    model = copy.deepcopy(lm.model)
    layers = smooth(model, calibration, alpha)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return {
        "method": "SmoothQuant (Xiao et al. 2023, arXiv:2211.10438)",
        "alpha": alpha,
        "linears_rescaled": layers,
        "calibration": source,
    }


def _eager_speed(lm: CausalLM, prompt: list[int], context_length: int, threads: int) -> dict:
    """PyTorch eager prefill of ``prompt`` and up to :data:`SPEED_NEW_TOKENS` greedy decode steps with
    transformers' cache: ``threads``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``."""
    import torch

    with torch.inference_mode():
        lm.model(torch.tensor([prompt[:8]]), use_cache=True)  # warm-up: the first call allocates
        t0 = time.perf_counter()
        out = lm.model(torch.tensor([prompt]), use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, t = out.cache, int(torch.argmax(out.logits[0, -1]))
        steps = min(SPEED_NEW_TOKENS, context_length - len(prompt) - 1)
        t1 = time.perf_counter()
        for _ in range(steps):
            out = lm.model(torch.tensor([[t]]), cache=past, use_cache=True)
            past, t = out.cache, int(torch.argmax(out.logits[0, -1]))
        decode_s = time.perf_counter() - t1
    return {
        "threads": threads,
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "decode_tokens_per_s": steps / decode_s if decode_s > 0 else 0.0,
    }


@dataclass
class Hybrid:
    """A hybrid RNN-Transformer checkpoint (``edgelm compress --method hybrid-qrnn``) being exported: its
    teacher (the Llama-family layers ExecuTorch's transformer is built from), the QRNN blocks' weights by layer
    and the checkpoint's ``hybrid_qrnn.json``."""

    teacher: CausalLM
    recurrent: dict[int, dict]
    doc: dict
    teacher_tokens: list[list[int]] = field(default_factory=list)
    teacher_perplexity: float | None = None


@dataclass
class SoftPrompt:
    """A prompt-tuned checkpoint (``edgelm adapt --method prompt-tuning | scaled-prompt-tuning`` on a causal
    LM) being exported: the base model, its soft prompt's keys and values per layer (see
    :func:`edgelm.adapt.generation.prefix_cache`) and ``edgelm_adapt.json``."""

    base: CausalLM
    keys: list
    values: list
    record: dict

    @property
    def tokens(self) -> int:
        return int(self.keys[0].shape[1])


def load_prompt_tuned_lm(model: str, record: dict) -> tuple[CausalLM, SoftPrompt]:
    """A prompt-tuned checkpoint as (the model with its soft prompt before every sequence: the reference, the
    :class:`SoftPrompt`). Raises ModelError for a missing or corrupt soft prompt."""
    from edgelm.adapt.generation import load_soft_prompt, prefix_cache, prefixed_model

    base = load_causal_lm(model)
    prompt = load_soft_prompt(model, int(base.config["hidden_size"]))
    keys, values = prefix_cache(base.model, prompt)
    lm = copy.copy(base)
    lm.model = prefixed_model(base.model, prompt)
    return lm, SoftPrompt(base, keys, values, record)


def load_hybrid_lm(model: str) -> tuple[CausalLM, Hybrid]:
    """A hybrid checkpoint as (the hybrid as a :class:`CausalLM`: its PyTorch model is the reference, the
    :class:`Hybrid`). Raises ModelError for an incomplete checkpoint."""
    from edgelm.compress.hybrid_qrnn import load_hybrid, qrnn_blocks

    model_h, teacher, doc = load_hybrid(model)
    lm = copy.copy(teacher)
    lm.model = model_h
    recurrent = {
        i: {"window": b.window, **{k: v.detach().float().numpy() for k, v in b.state_dict().items()}}
        for i, b in qrnn_blocks(model_h).items()
    }
    return lm, Hybrid(teacher, recurrent, doc)


def _export_plan(
    lm: CausalLM,
    plan,
    recipe: GenerationRecipe,
    ref: Reference,
    tmp: Path,
    work: Path,
    hybrid: Hybrid | None = None,
    soft: SoftPrompt | None = None,
) -> dict:
    path = tmp / plan.artifact_name
    q = plan.quant
    common = {"scheme": q.scheme, "group_size": q.group_size, "max_context_len": recipe.context_length}
    try:
        if plan.format == "executorch":
            # a hybrid: the teacher's layers with its QRNN blocks put in; prompt-tuned: the base model's
            base = hybrid.teacher if hybrid else soft.base if soft else lm
            ckpt, params = executorch_checkpoint(base, work / "executorch")
            info = decoder.export_executorch(
                ckpt,
                params,
                path,
                bos_id=lm.bos_id,
                eos_ids=lm.eos_ids,
                vocab_size=lm.vocab_size,
                blocks=executorch_blocks(base),
                recurrent=hybrid.recurrent if hybrid else None,
                prefix={"keys": soft.keys, "values": soft.values} if soft else None,
                max_seq_len=min(HYBRID_PREFILL_CHUNK + 1, recipe.context_length + 1) if hybrid else None,
                **common,
            )
            companions: list[Path] = []
        else:
            hf_dir, smoothed = work / "hf", None
            if plan.format == "tflite" and q.scheme == "int8_dynamic" and recipe.smoothquant_alpha > 0:
                # int8 activations on the fly: SmoothQuant moves the outlier channels' range into the weights first
                hf_dir = work / "hf-smoothquant"
                smoothed = _smoothed_checkpoint(lm, ref, recipe.smoothquant_alpha, hf_dir)
            elif not hf_dir.is_dir():
                save_hf_checkpoint(lm, hf_dir)
            if plan.format == "tflite":
                info = decoder_tflite.export_tflite(hf_dir, path, bos_id=lm.bos_id, eos_ids=lm.eos_ids, **common)
                if smoothed:
                    info |= {"smoothquant": smoothed, "weights": info["weights"] + ", after SmoothQuant"}
                companions = [decoder_tflite.config_path(path)]
            else:
                info = decoder.export_onnx(hf_dir, path, blocks=lm.blocks, **common)
                companions = decoder.onnx_files(path)
    except ExporterError as exc:
        raise ExportError(f"{plan.format}: {exc}") from exc
    files = [path, *companions]
    tflite = plan.format == "tflite"
    return {
        "file": path.name,
        "format": plan.format,
        "quantization": q.to_dict(),
        "sha256": sha256_file(path),
        "size_bytes": sum(f.stat().st_size for f in files),
        "inputs": [
            {"name": "tokens", "dtype": "int32" if tflite else "int64", "shape": [1, "n"]},
            {"name": "input_pos", "dtype": "int32" if tflite else "int64", "shape": ["n" if tflite else 1]},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [1 if plan.format == "executorch" else "n", lm.vocab_size]}
        ],
        "runtime": decoder.runtime_versions(path),
        "details": info,
        "export_seconds": info["seconds"],
        "companions": [
            {
                "file": c.name,
                "role": "config" if c.suffix == ".json" else "external weights",
                "sha256": sha256_file(c),
                "size_bytes": c.stat().st_size,
            }
            for c in companions
        ],
        "golden_reference": "reference_tokens",
    }


def _write_golden(tmp: Path, ref: Reference) -> None:
    arrays = {
        "prompt_tokens": generation.pad_tokens(ref.prompts, max(len(p) for p in ref.prompts)),
        "reference_tokens": generation.pad_tokens(ref.tokens, NEW_TOKENS),
        "reference_next_logits": ref.next_logits,
        "perplexity_tokens": ref.window,
        "speed_prompt": np.asarray(ref.speed_prompt, dtype=np.int64),
        "speed_new_tokens": np.asarray(SPEED_NEW_TOKENS, dtype=np.int64),
    }
    if ref.perplexity is not None:
        arrays["reference_perplexity"] = np.asarray(ref.perplexity, dtype=np.float64)
    np.savez(tmp / "golden.npz", **arrays)


def _versions() -> dict[str, str]:
    return exporters.base.package_versions(
        "edgelm", "torch", "transformers", "executorch", "torchao", "onnxruntime", "onnxruntime-genai", "gguf", "numpy"
    )


def export_generative(
    recipe: GenerationRecipe,
    model: str,
    out: str | Path = "dist",
    *,
    data: str | None = None,
    progress: ProgressFn | None = None,
    bundle: str | None = None,
) -> dict:
    """Export the generative ``model`` for the recipe's device and check every artifact on this host; write
    ``out/<device>/`` (artifacts, tokenizer, golden.npz, manifest.json, validation.json, report.md, logs/).

    Args:
        recipe: :func:`edgelm.recipe.make_generation_recipe`.
        model: a packaged name (``smollm2-135m``), a ``.gguf`` file or a checkpoint directory.
        data: a plain-text file for the perplexity window (default: WikiText-2, see :func:`default_text`).
        bundle: ``"android"``: also write the demo app's assets (:func:`edgelm.appbundle.write_android_bundle`).
    Returns:
        The summary: ``{"bundle", "passed", "model", "rows": [per artifact], "reference": {...}}``.
    Raises:
        EdgeLMError subclasses for bad input or a failed export (nothing is written). A missed gate is
        ``passed == False`` with the bundle written (the CLI exits 1).
    """
    from edgelm.adapt.generation import read_adapt_record
    from edgelm.compress.hybrid_qrnn import read_hybrid_config
    from edgelm.fsutil import captured_output

    is_hybrid = read_hybrid_config(model) is not None
    adapted = read_adapt_record(model)
    recipe, skipped = recipe_for_model(recipe, model)
    text = Path(data) if data else default_text()
    if text is not None and not text.is_file():
        raise DataError(f"perplexity text not found: {text}")
    threads = min(recipe.threads, os.cpu_count() or 1)
    app_bundle = bundle
    total, done = 6 + len(recipe.plans) + (app_bundle is not None), 0

    def step(desc: str) -> None:
        nonlocal done
        if progress:
            progress(desc, done, total)
        done += 1

    final = Path(out) / recipe.device
    summary: dict = {}

    def fill(tmp: Path) -> None:
        (tmp / "logs").mkdir()
        work = tmp / ".work"  # converted checkpoints; inside the partial folder, so a killed run's is cleaned too
        work.mkdir()
        try:
            with captured_output(tmp / "logs" / "export.log"):
                _fill(tmp, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _fill(tmp: Path, work: Path) -> None:
        t_start = time.perf_counter()
        step("load model")
        hybrid = soft = None
        if is_hybrid:
            lm, hybrid = load_hybrid_lm(model)
        elif adapted and adapted.get("method") != "lora":
            lm, soft = load_prompt_tuned_lm(model, adapted)
        else:
            lm = load_causal_lm(model)
        step("reference (PyTorch eager)")
        ref = reference_stage(lm, recipe, text, threads)
        if hybrid:  # the teacher's greedy tokens and perplexity, to say what the replacement cost
            t_ref = reference_stage(hybrid.teacher, recipe, text, threads, speed=False)
            hybrid.teacher_tokens, hybrid.teacher_perplexity = t_ref.tokens, t_ref.perplexity
        entries = []
        for plan in recipe.plans:
            step(f"export {plan.artifact_name}")
            entries.append(_export_plan(lm, plan, recipe, ref, tmp, work, hybrid, soft))
        facts = {"hybrid": _hybrid_facts(hybrid, ref)} if hybrid else {}
        facts |= {"soft_prompt": _soft_prompt_facts(soft)} if soft else {}
        step("write bundle")
        lm.tokenizer.save_pretrained(tmp)
        tok_files = sorted(
            f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja") if (tmp / f).is_file()
        )
        _write_golden(tmp, ref)
        step("check the runtimes' tokenizers")
        wikitext = default_text()  # WikiText-2 and SST-2 dev from the shared data, when it is there
        data_root = wikitext.parents[2] if wikitext is not None else None
        tokenizer_check = check_tokenizers(tmp, data_root, [_prompt_text(lm, p) for p in PROMPTS])
        write_check(tmp, tokenizer_check)
        n_layers = int(lm.config.get("num_hidden_layers", 0))
        est = decoder_estimate(
            recipe.hardware, lm.config, recipe.context_length, n_layers - len(hybrid.recurrent) if hybrid else None
        )
        gguf_type = lm.blocks_type  # an 8-bit head only where the blocks are carried
        for e in entries:  # the artifact's own size; a separate embedding table is read one row per token
            q = e["quantization"]
            _, gathered = decoder_weight_bytes(
                lm.config, q["scheme"], q["group_size"], e["format"], gguf_type, recipe.context_length
            )
            e["estimate"] = est.for_size(e["size_bytes"], gathered)
        manifest = Manifest.model_validate(
            {
                "schema": SCHEMA,
                "edgelm_version": edgelm.__version__,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "device": recipe.profile,
                "recipe": {**recipe.to_dict(), "seq_len": recipe.context_length},
                "model": {
                    **lm.describe(),
                    **facts,
                    "kind": tasks.TEXT_GENERATION.kind,
                    "output": "logits",
                    "task": "text-generation",
                },
                "tokenizer": {"files": tok_files, "max_length": recipe.context_length},
                "golden": {
                    "file": "golden.npz",
                    "sha256": sha256_file(tmp / "golden.npz"),
                    "count": len(ref.prompts),
                    "source": f"{len(PROMPTS)} built-in prompts" + (", chat template" if lm.chat_template else ""),
                    "output": "reference_tokens",
                },
                "artifacts": entries,
                "versions": _versions(),
                "generation": {
                    "reference": lm.reference,
                    "new_tokens": NEW_TOKENS,
                    "perplexity_text": ref.text_source,
                    "perplexity_tokens": len(ref.window),
                    "reference_perplexity": ref.perplexity,
                    "eager": ref.eager,
                    "host": hostinfo.cpu_info(),
                    "runtime_tokenizers": {
                        "file": "tokenizer_check.json",
                        "identical": {r["name"]: r["identical"] for r in tokenizer_check["runtimes"]},
                        "golden_prompts_identical": {
                            r["name"]: not r["encode_mismatches"].get("golden prompts")
                            for r in tokenizer_check["runtimes"]
                        },
                    },
                },
            }
        )
        (tmp / "manifest.json").write_text(manifest.to_json())
        step("check on this host")
        from edgelm.validate.bundle import evaluate, run_bundle, write_validation

        bundle = Bundle.load(tmp)
        bundle.location = final
        record = evaluate(
            bundle, run_bundle(bundle, HostRunner(), threads=threads, warmup=WARMUP_STEPS, runs=TIMED_STEPS)
        )
        step("report")
        summary.update(_summary(final, lm, recipe, ref, entries, record, est, time.perf_counter() - t_start))
        summary["skipped"] = skipped
        summary.update(facts)
        summary["tokenizers"] = summary_lines(tokenizer_check)
        (tmp / "report.md").write_text(render_report(summary))
        write_validation(bundle, record)
        if app_bundle == "android":
            step("write the Android app's assets")
            from edgelm.appbundle import write_android_bundle

            write_android_bundle(tmp)

    fsutil.write_directory(final, fill)
    if progress:
        progress("done", done, done)
    return summary


#: Why a hybrid RNN-Transformer has no ONNX or LiteRT artifact.
HYBRID_FORMAT_REASON = (
    "ONNX Runtime GenAI's model builder and litert-torch's generative API build their own Llama layers and "
    "have no QRNN block; ExecuTorch's transformer takes one"
)


def recipe_for_model(recipe: GenerationRecipe, model: str) -> tuple[GenerationRecipe, list[dict]]:
    """The recipe's plans that ``model`` can take, and those it cannot (``{"artifact", "format", "reason"}``):
    a hybrid RNN-Transformer checkpoint exports to ExecuTorch only. Raises RecipeError when no plan is left;
    ModelError for an unreadable ``hybrid_qrnn.json``."""
    from edgelm.adapt.generation import read_adapt_record
    from edgelm.compress.hybrid_qrnn import read_hybrid_config

    adapted = read_adapt_record(model)
    if read_hybrid_config(model) is not None:
        what, reason = "a hybrid QRNN checkpoint", HYBRID_FORMAT_REASON
    elif adapted and adapted.get("method") != "lora":
        what, reason = f"prompt-tuned ({adapted.get('method')})", SOFT_PROMPT_FORMAT_REASON
    else:
        return recipe, []
    plans = [p for p in recipe.plans if p.format == "executorch"]
    if not plans:
        raise RecipeError(
            f"{model} is {what}: it exports to ExecuTorch only ({reason}); the recipe asks for "
            f"{', '.join(sorted({p.format for p in recipe.plans}))}: use --format executorch"
        )
    skipped = [
        {"artifact": p.artifact_name, "format": p.format, "reason": reason}
        for p in recipe.plans
        if p.format != "executorch"
    ]
    return dataclasses.replace(recipe, plans=plans), skipped


#: Why a prompt-tuned model has no ONNX or LiteRT artifact.
SOFT_PROMPT_FORMAT_REASON = (
    "its soft prompt is built into ExecuTorch's program (its keys and values written before the user's "
    "tokens); ONNX Runtime GenAI's model builder and litert-torch's generative API build their own graphs"
)


def _soft_prompt_facts(soft: SoftPrompt) -> dict:
    r = soft.record
    return {
        "method": r.get("method"),
        "tokens": soft.tokens,
        "examples": r.get("examples"),
        "train": r.get("train"),
        "eval_rouge_l": r.get("eval_rouge_l"),
        "separator": r.get("separator"),
    }


def soft_prompt_lines(f: dict) -> list[str]:
    """A prompt-tuned model's facts as the report's and the CLI's lines."""
    return [
        f"Soft prompt ({f['method']}, {f['tokens']} virtual tokens, trained on {f['examples']} pairs) built into "
        "the program before the user's tokens: the runtime passes the user's tokens from position 0. The "
        "reference is the PyTorch model with the same prompt."
    ]


def _hybrid_facts(hybrid: Hybrid, ref: Reference) -> dict:
    """What the manifest and report say about a hybrid: its layers, and the PyTorch hybrid against its teacher
    (perplexity on the same window, greedy-token agreement on the golden prompts)."""
    agree = generation.token_agreement(
        generation.pad_tokens(hybrid.teacher_tokens, NEW_TOKENS), generation.pad_tokens(ref.tokens, NEW_TOKENS)
    )
    n = int(hybrid.teacher.config.get("num_hidden_layers", 0))
    return {
        "method": "hybrid-qrnn",
        "recurrent_layers": sorted(hybrid.recurrent),
        "attention_layers": [i for i in range(n) if i not in hybrid.recurrent],
        "window": int(hybrid.doc["window"]),
        "prefill_chunk": HYBRID_PREFILL_CHUNK,
        "teacher_perplexity": hybrid.teacher_perplexity,
        "perplexity_vs_teacher": (
            ref.perplexity / hybrid.teacher_perplexity if ref.perplexity and hybrid.teacher_perplexity else None
        ),
        "token_agreement_vs_teacher": agree["agreement"],
        "mean_prefix_vs_teacher": agree["mean_prefix"],
    }


def hybrid_lines(h: dict) -> list[str]:
    """A hybrid's facts (:func:`_hybrid_facts`) as the report's and the CLI's lines."""
    ppl = (
        f"perplexity {h['perplexity_vs_teacher']:.3f}x the teacher's ({h['teacher_perplexity']:.2f})"
        if h.get("perplexity_vs_teacher")
        else "perplexity not measured"
    )
    return [
        f"Hybrid RNN-Transformer: layers {', '.join(map(str, h['recurrent_layers']))} are QRNNs (window "
        f"{h['window']}, state as mutable buffers; prompts fed {h['prefill_chunk']} tokens per call), "
        f"{len(h['attention_layers'])} attention layers keep a KV cache. The reference is the PyTorch hybrid; "
        f"against its teacher: {ppl}, greedy tokens equal on {h['token_agreement_vs_teacher']:.0%} of the prompts "
        f"(mean prefix {h['mean_prefix_vs_teacher']:.1f} tokens)."
    ]


def _summary(final, lm, recipe, ref, entries, record, est, seconds) -> dict:
    fp32_mb = lm.num_parameters * 4 / 1e6
    rows = []
    for e, plan in zip(entries, recipe.plans, strict=True):
        rec = record["artifacts"][e["file"]]
        fid, sp, sp1 = rec.get("fidelity") or {}, rec.get("speed") or {}, rec.get("speed_1_thread") or {}
        size = tasks.gate_checks(
            tasks.TEXT_GENERATION, {}, plan.gates, plan.quant.scheme, size_mb=e["size_bytes"] / 1e6
        )
        checks = {**rec["checks"], **size}  # the size budget beside what the host run checked
        rows.append(
            {
                "artifact": e["file"],
                "format": e["format"],
                "scheme": plan.quant.scheme,
                "size_mb": e["size_bytes"] / 1e6,
                "size_vs_fp32": e["size_bytes"] / 1e6 / fp32_mb,
                "perplexity": fid.get("perplexity"),
                "perplexity_ratio": fid.get("perplexity_ratio"),
                "token_agreement": fid.get("token_agreement"),
                "mean_prefix": fid.get("mean_prefix"),
                "prefill_tokens_per_s": sp.get("prefill_tokens_per_s"),
                "decode_tokens_per_s": sp.get("decode_tokens_per_s"),
                "decode_tokens_per_s_1_thread": sp1.get("decode_tokens_per_s")
                if sp1
                else sp.get("decode_tokens_per_s"),
                "ttft_ms": sp.get("ttft_ms"),
                "peak_rss_mb": rec.get("peak_rss_mb"),
                "estimate_decode_tokens_per_s": e["estimate"]["decode_tokens_per_s"],
                "status": rec["status"],
                "problems": "; ".join(f"{k}: {c['detail']}" for k, c in checks.items() if not c["passed"]),
                "size_ok": checks["max_size_mb"]["passed"],
                "max_size_mb": plan.gates.max_size_mb,
            }
        )
        if not rows[-1]["size_ok"]:
            rows[-1]["status"] = "failed"
    return {
        "bundle": str(final),
        "device": recipe.device,
        "display_name": recipe.display_name,
        "passed": all(r["status"] == "passed" for r in rows),
        "model": lm.describe(),
        "reference": {
            "perplexity": ref.perplexity,
            "text": ref.text_source,
            "tokens": len(ref.window),
            **{f"eager_{k}": v for k, v in ref.eager.items()},
        },
        "fp32_mb": fp32_mb,
        "context_length": recipe.context_length,
        "threads": record.get("threads"),
        "min_decode_tokens_per_s": recipe.min_decode_tokens_per_s,
        "ram_budget_mb": recipe.ram_budget_mb,
        "estimate": est.to_dict(),
        "host": hostinfo.describe(hostinfo.cpu_info()),
        "rows": rows,
        "seconds": seconds,
    }


def render_report(s: dict) -> str:
    """report.md of a generative bundle."""
    m, ref = s["model"], s["reference"]
    lines = [
        f"# edgelm report: {s['display_name']} ({s['device']}), text-generation",
        "",
        f"Model: {m['name']} ({m['architecture']}, {m['parameters'] / 1e6:.1f} M parameters, {m['layers']} layers, "
        f"vocabulary {m['vocab_size']}); reference: PyTorch eager fp32 of the {m['reference']}.",
        f"Context: {s['context_length']} tokens. Host: {s['host']}; host speed is not device speed.",
        "Perplexity: "
        + (
            f"{ref['perplexity']:.3f} (reference) over the first {ref['tokens']} tokens of {ref['text']}."
            if ref["perplexity"] is not None
            else "not measured (no text: pass --data FILE)."
        ),
        f"Token agreement: greedy {NEW_TOKENS} new tokens on {len(PROMPTS)} prompts, share equal to the reference's.",
        f"Speed: prompt of {SPEED_PROMPT_TOKENS} tokens, {SPEED_NEW_TOKENS} new tokens, at {s['threads']} thread(s) "
        f"and at 1; PyTorch eager (transformers' cache): prefill {ref['eager_prefill_tokens_per_s']:.0f} tokens/s, "
        f"decode {ref['eager_decode_tokens_per_s']:.1f} tokens/s.",
        "",
    ]
    if s.get("hybrid"):
        lines += [*hybrid_lines(s["hybrid"]), ""]
    if s.get("soft_prompt"):
        lines += [*soft_prompt_lines(s["soft_prompt"]), ""]
    rows = [
        {
            "artifact": r["artifact"],
            "size MB": f"{r['size_mb']:.1f} ({r['size_vs_fp32']:.2f}x fp32)",
            "ppl ratio": fmt(r["perplexity_ratio"], ".4f"),
            "agreement": fmt(r["token_agreement"], ".2f"),
            "prefix": fmt(r["mean_prefix"], ".1f"),
            "prefill tok/s": fmt(r["prefill_tokens_per_s"], ".0f"),
            "decode tok/s": fmt(r["decode_tokens_per_s"], ".1f"),
            "1 thread": fmt(r["decode_tokens_per_s_1_thread"], ".1f"),
            "TTFT ms": fmt(r["ttft_ms"], ".0f"),
            "peak RSS MB": fmt(r["peak_rss_mb"], ".0f"),
            "device est. tok/s": fmt(r["estimate_decode_tokens_per_s"], ".0f"),
            "status": r["status"],
        }
        for r in s["rows"]
    ]
    lines += markdown_table(rows)
    est = s["estimate"]
    lines += [
        "",
        f"Device estimate (cost model, memory-bound decode): {est['kv_cache_mb']:.1f} MB KV cache at "
        f"{s['context_length']} tokens, {est['prefill_gmacs_per_token']:.3f} GMAC per prompt token; decode "
        f"tokens/s = bandwidth / (weight bytes + KV bytes read per token). Goal: >= {s['min_decode_tokens_per_s']:g} "
        f"tokens/s, weights + KV cache <= {s['ram_budget_mb']:g} MB.",
    ]
    if s.get("tokenizers"):
        lines += [
            "",
            "Runtime tokenizers against Hugging Face `tokenizers` (tokenizer_check.json: WikiText-2 test lines, "
            "SST-2 dev sentences, hard cases, the golden prompts; encode and decode):",
            "",
            *[f"- {line}" for line in s["tokenizers"]],
        ]
    if s.get("skipped"):
        lines += ["", "Not exported:", *[f"- {k['artifact']}: {k['reason']}" for k in s["skipped"]]]
    problems = [f"- {r['artifact']}: {r['problems']}" for r in s["rows"] if r["problems"]]
    if problems:
        lines += ["", "Problems:", *problems]
    return "\n".join(lines) + "\n"
