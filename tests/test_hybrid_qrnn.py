"""Hybrid RNN-Transformer students (`edgelm compress --method hybrid-qrnn`): the QRNN layer's recurrent decode
equals its parallel prefill, the layer choice, the distillation, the checkpoint and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.compress import hybrid_qrnn as hq
from edgelm.errors import DataError, ModelError, RecipeError

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


@pytest.mark.parametrize("window", [1, 2, 3])
def test_qrnn_recurrent_decode_equals_parallel_prefill(window):
    import torch

    QRNN, _, _, fo_pool = hq.build_classes()
    torch.manual_seed(window)
    q = QRNN(16, 24, window)
    torch.nn.init.normal_(q.gates.weight, std=0.3)
    torch.nn.init.normal_(q.gates.bias, std=1.0)
    x = torch.randn(2, 150, 16)
    with torch.no_grad():
        whole, end = q.scan(x)
        state, steps = None, []
        for t in range(x.shape[1]):
            h, state = q.step(x[:, t : t + 1], state)
            steps.append(h)
        assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5)
        assert torch.allclose(state[0], end[0], atol=1e-5) and torch.equal(state[1], end[1])
        # a prefill of 100 positions, then decode steps from its state
        pre, state = q.scan(x[:, :100])
        rest = []
        for t in range(100, x.shape[1]):
            h, state = q.step(x[:, t : t + 1], state)
            rest.append(h)
        assert torch.allclose(torch.cat([pre, *rest], 1), whole, atol=1e-5)
        # fo-pooling against the recurrence written out, from a non-zero state
        z, f, c0 = torch.randn(1, 5, 3), torch.rand(1, 5, 3), torch.randn(1, 3)
        c, want = c0, []
        for t in range(5):
            c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
            want.append(c)
        assert torch.allclose(fo_pool(z, f, c0), torch.stack(want, 1), atol=1e-6)
    # its written-out gradient against autograd's through the plain recurrence (float64)
    z = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    f = torch.rand(2, 7, 3, dtype=torch.float64).requires_grad_(True)
    c0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fo_pool, (z, f, c0))


def test_layer_choice_takes_the_cheapest_attention_layers():
    # layer 0 is never chosen by share; ties go to the later layer
    importance = [10.0, 30.0, 12.0, 12.0, 50.0, 11.0]
    assert hq.choose_layers(importance, 0.5, 6) == [2, 3, 5]
    assert hq.choose_layers(importance, 0.2, 6) == [5]
    assert hq.choose_layers(importance, [4, 1, 4], 6) == [1, 4]
    for bad in (0.0, 1.0, 1.5, []):
        with pytest.raises(RecipeError):
            hq.choose_layers(importance, bad, 6)
    with pytest.raises(RecipeError, match=r"layers 0\.\.5"):
        hq.choose_layers(importance, [6], 6)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from edgelm.testing import make_causal_lm

    return make_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=4)


def test_hybrid_with_transformers_cache_equals_the_whole_pass(tiny_lm):
    """Generation with transformers' cache (prefill, then decode steps) carries each QRNN's state on the cache:
    the logits equal one pass over the whole sequence, also with layer 0 a QRNN (the cache's length)."""
    import torch

    from edgelm.causal_lm import load_causal_lm

    lm = load_causal_lm(tiny_lm)
    model = hq.make_hybrid(lm.model, [0, 2])
    for b in hq.qrnn_blocks(model).values():
        torch.nn.init.normal_(b.gates.weight, std=0.3)
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 300, (1, 20)))
    with torch.no_grad():
        whole = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert cache.get_seq_length() == 20
        assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-4)
        # a new cache starts from zeros: the same prompt gives the same logits again
        again = model(ids[:, :12], use_cache=True).logits
        assert torch.allclose(again, whole[:, :12], atol=1e-5)


def test_attention_importance_equals_whole_passes_with_the_attention_dropped(tiny_lm):
    """The fast measurement (layers i.. from the teacher's own inputs) equals a whole forward pass of the model
    with layer i's attention dropped."""
    from edgelm.causal_lm import load_causal_lm

    lm = load_causal_lm(tiny_lm)
    windows = np.random.default_rng(0).integers(3, 300, (5, 24)).astype(np.int64)
    _, _, DroppedAttention, _ = hq.build_classes()
    slow = []
    for layer in lm.model.model.layers:
        kept, layer.self_attn = layer.self_attn, DroppedAttention()
        slow.append(hq.perplexity(lm.model, windows, batch_size=2))
        layer.self_attn = kept
    steps = []
    fast = hq.attention_importance(lm.model, windows, lambda d, t: steps.append((d, t)), batch_size=2)
    assert steps == [(d, 12) for d in range(1, 13)]  # 4 layers x 3 batches, each reported
    assert np.allclose(fast, slow, rtol=1e-4) and len(set(np.round(fast, 3))) == 4
    assert hq.perplexity(lm.model, windows) not in fast  # each measurement dropped something


def test_token_nll_columns_are_context_positions(tiny_lm):
    """Column j of token_nll is the loss of token j + 1 given tokens 0..j alone (a prefix pass), and the
    perplexity is exp of its mean."""
    import torch

    from edgelm.causal_lm import load_causal_lm

    lm = load_causal_lm(tiny_lm)
    windows = np.random.default_rng(1).integers(3, 300, (3, 20)).astype(np.int64)
    nll = hq.token_nll(lm.model, windows, batch_size=2)
    assert nll.shape == (3, 19) and nll.dtype == np.float64
    for j in (0, 7, 18):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.from_numpy(windows[:, : j + 1])).logits[:, -1]
        want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(windows[:, j + 1]), reduction="none")
        assert np.allclose(nll[:, j], want.numpy(), atol=1e-4)
    assert hq.perplexity(lm.model, windows) == pytest.approx(float(np.exp(nll.mean())), rel=1e-9)
    assert len(set(np.round(nll[0], 4))) > 10  # real per-token values, not one mean repeated


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from edgelm.data import PROBE_SENTENCES
    from edgelm.generation import PROMPTS

    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join([*PROBE_SENTENCES, *PROMPTS] * 3) + "\n")
    return path


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, tiny_lm, text_file):
    out = tmp_path_factory.mktemp("hyb") / "hybrid"
    r = cli(
        "compress", "--method", "hybrid-qrnn", "--model", str(tiny_lm), "--data", str(text_file), "--replace", "0.5",
        "--local-steps", "200", "--e2e-steps", "10", "--seq-len", "32", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return out, r.output


def test_compress_hybrid_qrnn_writes_a_checkpoint_that_loads(hybrid, tiny_lm):
    import torch

    out, output = hybrid
    assert "2 of 4 attention layers replaced" in output and "after end-to-end distillation" in output
    doc = json.loads((out / hq.CONFIG_FILE).read_text())
    layers = doc["replaced_layers"]
    assert len(layers) == 2 and 0 not in layers
    # the layers whose dropped attention cost the least perplexity, measured
    imp = doc["importance_perplexity"]
    assert len(imp) == 4 and all(imp[i] <= imp[j] for i in layers for j in range(1, 4) if j not in layers)
    # layer-local distillation reduced the blocks' normalised error
    loss = doc["local_loss"]
    assert len(loss) == 200 and np.mean(loss[-20:]) < 0.8 * np.mean(loss[:20])
    assert len(doc["e2e_loss"]) == 10 and doc["teacher"]["layers"] == 4
    model, teacher, cfg = hq.load_hybrid(out)
    assert sorted(hq.qrnn_blocks(model)) == layers and cfg["window"] == 2
    ids = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        hybrid_logits = model(input_ids=ids, use_cache=False).logits
        teacher_logits = teacher.model(input_ids=ids, use_cache=False).logits
        # the folder's Hugging Face checkpoint is the teacher, unchanged
        from edgelm.causal_lm import load_causal_lm

        original = load_causal_lm(tiny_lm).model(input_ids=ids, use_cache=False).logits
    assert torch.equal(teacher_logits, original)
    assert not torch.allclose(hybrid_logits, teacher_logits, atol=1e-3)
    # the replaced layers' self-attention is gone from the hybrid's computation: changing it changes nothing
    with torch.no_grad():
        for i in layers:
            teacher.model.model.layers[i].self_attn.o_proj.weight.zero_()
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, hybrid_logits)


def test_hybrid_checkpoint_refusals(hybrid, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = hybrid
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    state = load_file(str(broken / hq.WEIGHTS_FILE))
    first = min(int(k.split(".")[1]) for k in state)
    del state[f"layers.{first}.o_proj.weight"]
    save_file(state, str(broken / hq.WEIGHTS_FILE))
    with pytest.raises(ModelError, match=f"does not cover the QRNN block of layer {first}"):
        hq.load_hybrid(broken)
    (broken / hq.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        hq.load_hybrid(broken)
    # a hybrid exports to ExecuTorch only: asking for ONNX alone is refused, nothing written
    r = cli("export", "--device", "pixel8", "--model", str(out), "--format", "onnx", "--out", str(tmp_path / "dist"))
    assert r.exit_code == 2 and "exports to ExecuTorch only" in r.output and "--format executorch" in r.output
    assert not (tmp_path / "dist" / "pixel8").exists()
    r = cli("export", "--device", "pixel8", "--model", str(broken), "--out", str(tmp_path / "dist"))
    assert r.exit_code == 2 and "corrupt" in r.output


def test_hybrid_exports_to_executorch_with_its_state_and_equals_pytorch(hybrid, tmp_path):
    """``edgelm export`` of a hybrid: the .pte (fp32) holds the QRNN state as mutable buffers beside the
    remaining layers' KV cache; a prefill split into chunks and decode steps give PyTorch's logits, a call at
    position 0 starts again from zeros, and the bundle passes its gates against the PyTorch hybrid."""
    import torch

    from exporters import decoder

    out, _ = hybrid
    r = cli(
        "export", "--device", "pixel8", "--model", str(out), "--quant", "fp32", "--context-length", "160",
        "--out", str(tmp_path / "dist"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "dist" / "pixel8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    (art,) = manifest["artifacts"]  # onnx and tflite are not built for a hybrid: said, not written
    assert art["format"] == "executorch" and "not exported: model.fp32.onnx" in r.output
    doc = json.loads((out / hq.CONFIG_FILE).read_text())
    facts = manifest["model"]["hybrid"]
    assert (
        facts["recurrent_layers"] == doc["replaced_layers"]
        and art["details"]["recurrent_layers"] == facts["recurrent_layers"]
    )
    assert "Hybrid RNN-Transformer: layers" in r.output
    validation = json.loads((bundle / "validation.json").read_text())
    fid = validation["runners"]["host"]["artifacts"][art["file"]]["fidelity"]
    assert fid["token_agreement"] == 1.0 and abs(fid["perplexity_ratio"] - 1) < 1e-3

    model, _, _ = hq.load_hybrid(out)
    session = decoder.load_decoder(bundle / art["file"])
    assert session.max_seq == 64  # prompts are fed 64 tokens per call
    ids = np.random.default_rng(3).integers(3, 300, 150)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = [session.forward(ids[:140], 0)[-1]]  # 64 + 64 + 12 tokens
    got += [session.forward(ids[p : p + 1], p)[-1] for p in range(140, 150)]
    assert np.abs(np.stack(got) - want[139:150]).max() < 1e-3
    again = session.forward(ids[:20], 0)[-1]  # position 0: the QRNN state starts from zeros again
    assert np.abs(again - want[19]).max() < 1e-3


def test_read_text_keeps_a_text_file_as_written_and_a_dataset_row_by_row(tmp_path):
    wiki = tmp_path / "wiki.valid.tokens"
    wiki.write_text(" \n = Lobster = \n \n The lobster is a species .\n")
    rows = tmp_path / "rows.tsv"
    rows.write_text("sentence\tlabel\nfirst row\t1\nsecond row\t0\n")
    # line breaks and the heading stay: the test set is read the same way when its perplexity is measured
    assert hq.read_text([wiki, rows]) == [wiki.read_text(), "first row", "second row"]
    # AG News' CSV (Class Index, Title, Description): its descriptions, as the hybrid benchmark trains on them
    agnews = hq.read_text([SHARED_DATA / "agnews" / "test.csv"])
    assert len(agnews) == 7600 and agnews[0].startswith("Unions representing workers at Turner")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(DataError, match="no text"):
        hq.read_text([tmp_path / "blank.txt"])


def test_compress_hybrid_qrnn_refuses_bad_input(tiny_lm, text_file, tmp_path):
    base = ["compress", "--method", "hybrid-qrnn", "--model", str(tiny_lm), "--out", str(tmp_path / "h")]
    r = cli(*base, "--data", str(text_file), "--replace", "1.5")
    assert r.exit_code == 2 and "above 0 and below 1" in r.output
    r = cli(*base, "--data", str(text_file), "--replace", "2,9")
    assert r.exit_code == 2 and "layers 0..3" in r.output
    r = cli(*base, "--data", str(text_file), "--replace", "half")
    assert r.exit_code == 2 and "--replace 'half'" in r.output
    test_set = tmp_path / "wiki.test.raw"
    test_set.write_text("held out\n")
    r = cli(*base, "--data", str(test_set))
    assert r.exit_code == 2 and "where the hybrid's perplexity is measured" in r.output
    r = cli(*base, "--data", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "h").exists()
    with pytest.raises(DataError, match="fewer than one window"):
        from edgelm.causal_lm import load_causal_lm

        hq.token_windows(load_causal_lm(tiny_lm).tokenizer, ["two words"], 64)
