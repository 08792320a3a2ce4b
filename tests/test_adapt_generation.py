"""``edgelm adapt`` on a causal LM (source/target pairs): prompt tuning, scaled prompt tuning, LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgelm.adapt import generation as g
from edgelm.cli import app
from edgelm.errors import DataError

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edgelm.testing import make_causal_lm

    d = tmp_path_factory.mktemp("gen")
    model = make_causal_lm(d / "tiny", layers=2)
    pairs = d / "pairs.tsv"
    rows = ["source\ttarget"] + [f"the number {i} is written here today\tnumber {i}" for i in range(40)]
    pairs.write_text("\n".join(rows) + "\n")
    return model, pairs


def test_pairs_read_from_tsv_jsonl_and_the_ag_news_layout(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"source": "a b", "target": "c"}\n\n{"source": "d", "target": "e  f"}\n')
    assert g.load_pairs(j) == [("a b", "c"), ("d", "e f")]
    ag = tmp_path / "ag.csv"
    ag.write_text('Class Index,Title,Description\n3,Fears for pension,"Unions say they are\\\\disappointed"\n')
    assert g.load_pairs(ag) == [("Unions say they are disappointed", "Fears for pension")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(DataError, match="'source' and 'target'"):
        g.load_pairs(bad)
    with pytest.raises(DataError, match="only 2 pairs"):
        g.sample_pairs(g.load_pairs(j), 3, 0)
    assert g.rouge_l(["the cat sat"], ["the cat sat"]) == 100.0
    assert 0 < g.rouge_l(["the cat"], ["the cat sat down"]) < 100.0


def test_batched_greedy_generation_equals_one_at_a_time(tmp_path):
    """Scoring decodes in left-padded batches: each source's tokens equal its own greedy decoding, with and
    without a soft prompt before it, across sources of different lengths and a batch that is not full."""
    import torch

    from edgelm.causal_lm import load_causal_lm
    from edgelm.testing import make_causal_lm

    lm = load_causal_lm(make_causal_lm(tmp_path / "m", init_std=0.3))  # clear arg-maxes, a prompt changes them
    rng = np.random.default_rng(3)
    sources = [[int(x) for x in rng.integers(3, 300, n)] for n in (5, 17, 9, 12, 3)]
    eos = lm.eos_ids
    torch.manual_seed(0)
    outputs = []
    for prompt in (None, torch.randn(4, 64)):
        batched = g.generate_batch(lm.model, sources, 12, eos, prompt, batch_size=2)
        single = [g.generate_text(lm.model, lm.tokenizer, s, 12, eos, prompt) for s in sources]
        assert batched == single and all(len(x) > 0 for x in single)
        outputs.append(batched)
    assert outputs[0] != outputs[1]  # the prompt is there


@pytest.mark.parametrize("method", ["scaled-prompt-tuning", "lora"])
def test_adapt_a_causal_lm_on_pairs(tiny, tmp_path, method):
    import torch

    model, pairs = tiny
    out = tmp_path / method
    r = cli(
        "adapt", "--model", str(model), "--method", method, "--data", str(pairs), "--shots", "16",
        "--eval", str(pairs), "--eval-limit", "8", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"{method}: 16 pairs" in r.output and "ROUGE-L on" in r.output
    assert "warn" not in r.output.lower() and (out / "logs" / "adapt.log").is_file()  # third-party output kept apart
    rec = json.loads((out / g.ADAPT_FILE).read_text())
    assert rec["examples"] == 16 and rec["eval_pairs"] == 8 and rec["task"] == "text-generation"
    assert np.mean(rec["history"][-10:]) < np.mean(rec["history"][:10])  # it learned
    from edgelm.causal_lm import load_causal_lm

    base, adapted = load_causal_lm(model), load_causal_lm(out)
    same = all(torch.equal(a, b) for a, b in zip(base.model.parameters(), adapted.model.parameters(), strict=True))
    if method == "lora":  # merged into the weights; no soft prompt
        assert not same and not (out / g.SOFT_PROMPT_FILE).exists()
    else:  # the model unchanged; the soft prompt [16, H] beside it, scale applied
        from safetensors.torch import load_file

        assert same
        prompt = load_file(str(out / g.SOFT_PROMPT_FILE))["soft_prompt"]
        assert tuple(prompt.shape) == (16, 64)
        # the trained prompt makes the targets likelier than the untrained model finds them
        nll = []
        for soft in (None, prompt):
            losses = []
            for src, tgt in g.load_pairs(pairs)[:8]:
                ids, start = g.example_ids(base.tokenizer, (src, tgt), g.GenAdaptConfig(), base.eos_ids[0])
                with torch.no_grad():
                    emb = base.model.get_input_embeddings()(torch.tensor([ids]))
                    if soft is not None:
                        emb = torch.cat([soft[None], emb], 1)
                    logits = base.model(inputs_embeds=emb).logits[0, -len(ids) :]
                logp = torch.log_softmax(logits[start - 1 : -1], -1)
                losses.append(-logp[torch.arange(len(ids) - start), torch.tensor(ids[start:])].mean().item())
            nll.append(np.mean(losses))
        assert nll[1] < nll[0] - 0.1
        r = cli("export", "--device", "pixel8", "--model", str(out), "--format", "onnx", "--out", str(tmp_path / "d"))
        assert r.exit_code == 2 and "exports to ExecuTorch only" in r.output


def test_lora_on_a_gguf_keeps_the_blocks_and_carries_the_update(tiny, tmp_path):
    """LoRA on a GGUF model: the merged checkpoint still carries the GGUF's own 4-bit blocks for every adapted
    projection, with the merged update (rank <= r) beside them, so that the export does not quantize the
    adapted weights a second time; blocks plus update give the merged weights."""
    import torch

    from edgelm.causal_lm import load_causal_lm
    from edgelm.testing import write_gguf

    model, pairs = tiny
    gguf = write_gguf(model, tmp_path / "tiny.Q4_1.gguf")
    out = tmp_path / "lora"
    r = cli(
        "adapt", "--model", str(gguf), "--method", "lora", "--rank", "4", "--data", str(pairs), "--shots", "16",
        "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    base, adapted = load_causal_lm(str(gguf)), load_causal_lm(out)
    weights = adapted.model.state_dict()
    carried = {n: b for n, b in adapted.blocks.items() if b.lowrank is not None}
    assert len(carried) == 2 * len(g.LORA_TARGETS)  # every adapted projection of the 2 layers
    for name, b in carried.items():
        up, down = b.lowrank
        assert 1 <= up.shape[1] <= 4 and down.shape == (up.shape[1], b.codes.shape[1])
        np.testing.assert_array_equal(b.codes, base.blocks[name].codes)
        np.testing.assert_allclose(b.dequantize() + up @ down, weights[name].numpy(), rtol=0, atol=1e-6)
        assert not torch.equal(weights[name], base.model.state_dict()[name])


def test_prompt_tuned_model_exports_with_its_soft_prompt_inside_the_pte(tiny, tmp_path):
    """The soft prompt's keys and values are written by the program before the user's tokens: the .pte, fed only
    the user's tokens from position 0, equals PyTorch with the prompt before them; the bundle passes."""
    import torch

    from edgelm.adapt.generation import load_soft_prompt, prefixed_model
    from edgelm.causal_lm import load_causal_lm
    from exporters import decoder

    model, pairs = tiny
    out = tmp_path / "pt"
    r = cli(
        "adapt", "--model", str(model), "--method", "prompt-tuning", "--virtual-tokens", "8", "--data", str(pairs),
        "--shots", "8", "--epochs", "3", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli(
        "export", "--device", "pixel8", "--model", str(out), "--quant", "fp32", "--context-length", "160",
        "--out", str(tmp_path / "dist"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "dist" / "pixel8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    (art,) = manifest["artifacts"]
    assert manifest["model"]["soft_prompt"]["tokens"] == 8 and art["details"]["soft_prompt_tokens"] == 8
    assert "Soft prompt (prompt-tuning, 8 virtual tokens" in r.output and "not exported: model.fp32.onnx" in r.output
    host = json.loads((bundle / "validation.json").read_text())["runners"]["host"]["artifacts"][art["file"]]
    assert host["fidelity"]["token_agreement"] == 1.0

    base = load_causal_lm(out)
    ref = prefixed_model(base.model, load_soft_prompt(out, 64))
    session = decoder.load_decoder(bundle / art["file"])
    assert session.max_context == 160  # the user's context; the prompt's 8 positions come on top
    ids = np.random.default_rng(4).integers(3, 300, 30)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)[None]).logits[0].numpy()
        plain = base.model(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = [session.forward(ids[:20], 0)[-1]] + [session.forward(ids[p : p + 1], p)[-1] for p in range(20, 30)]
    assert np.abs(np.stack(got) - want[19:30]).max() < 1e-3
    assert np.abs(np.stack(got) - plain[19:30]).max() > 1e-2  # the prompt is there


def test_adapt_refuses_bad_input(tiny, tmp_path):
    model, pairs = tiny
    base = ["adapt", "--model", str(model), "--out", str(tmp_path / "a")]
    r = cli(*base, "--method", "prompt-tuning", "--data", str(pairs), "--shots", "99")
    assert r.exit_code == 2 and "only 40 pairs" in r.output
    r = cli(*base, "--method", "adapters", "--data", str(pairs))
    assert r.exit_code == 2 and "unknown adaptation method" in r.output
    r = cli(*base, "--method", "lora")
    assert r.exit_code == 2 and "source/target pairs" in r.output
    assert not (tmp_path / "a").exists()
