"""Every exporter, both precisions, on tiny random-config models: parity with PyTorch in the real runtime."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import exporters
from edgelm.data import encode, load_tokenizer, probe_dataset
from edgelm.models import load_model
from exporters import QuantSpec

SEQ = 64
INT8 = QuantSpec("int8_dynamic", per_channel=True, embedding_bits=8)
FP32 = QuantSpec("fp32")


def _inputs(model_dir, n=12):
    tok = load_tokenizer(model_dir, SEQ)
    data = probe_dataset()
    data.texts = data.texts[::6][:n]
    return encode(tok, data)


def _export(loaded, fmt, quant, path):
    example = {
        "input_ids": torch.ones(1, SEQ, dtype=torch.int64),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
    }
    return exporters.get(fmt).export(
        loaded.module, example, quant, path, exporters.ExportOptions(output_name=loaded.output_name)
    )


def _run_rows(session, ids, mask):
    """Run each row at its own (trimmed) length, as the validation runner does."""
    from exporters.base import trim_padding

    return np.concatenate(
        [
            next(
                iter(
                    session.run(trim_padding({"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})).values()
                )
            )
            for i in range(len(ids))
        ]
    )


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    """Export the tiny BERT embedding model once per (format, scheme)."""
    loaded = load_model(tiny_bert)
    out = tmp_path_factory.mktemp("artifacts")
    arts = {}
    for fmt in exporters.formats():
        for q in (FP32, INT8):
            arts[(fmt, q.scheme)] = _export(loaded, fmt, q, out / f"m.{q.scheme}{exporters.suffix(fmt)}")
    return loaded, arts


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
@pytest.mark.parametrize("scheme", ["fp32", "int8_dynamic"])
def test_parity_with_pytorch(exported, tiny_bert, fmt, scheme):
    loaded, arts = exported
    art = arts[(fmt, scheme)]
    ids, mask = _inputs(tiny_bert)
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    out = _run_rows(exporters.load(art.path, threads=1), ids, mask)
    assert out.shape == ref.shape == (len(ids), 64)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    if scheme == "fp32":
        assert np.abs(out - ref).max() < 1e-4
    else:
        assert cos.min() > 0.98
        assert np.abs(out - ref).max() > 1e-6  # it really is quantized
    assert art.sha256() == exporters.sha256_file(art.path)
    assert art.quant.scheme == scheme
    meta = art.to_dict()
    assert meta["outputs"][0]["name"] == "embeddings"
    assert meta["inputs"][0]["dtype"] == ("int32" if fmt == "tflite" else "int64")


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
def test_int8_is_smaller(exported, fmt):
    _, arts = exported
    # weights shrink 4x; on a 0.2 MB model the graph (three signatures for TFLite) is a large share of the file
    assert arts[(fmt, "int8_dynamic")].size_bytes < 0.65 * arts[(fmt, "fp32")].size_bytes


def test_tflite_buckets_and_padding(exported, tiny_bert):
    _, arts = exported
    sess = exporters.load(arts[("tflite", "fp32")].path)
    assert sess.buckets == [16, 32, 64]
    assert arts[("tflite", "fp32")].details["signatures"] == ["seq_16", "seq_32", "seq_64"]
    ids, mask = _inputs(tiny_bert, n=3)
    # the same row padded to 64 or trimmed to its length gives the same embedding
    full = sess.run({"input_ids": ids[:1], "attention_mask": mask[:1]})["embeddings"]
    n = int(mask[0].sum())
    short = sess.run({"input_ids": ids[:1, :n], "attention_mask": mask[:1, :n]})["embeddings"]
    np.testing.assert_allclose(full, short, atol=1e-5)
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        sess.run({"input_ids": np.ones((1, 65), np.int64), "attention_mask": np.ones((1, 65), np.int64)})


def test_onnx_takes_batches_and_lengths(exported, tiny_bert):
    loaded, arts = exported
    ids, mask = _inputs(tiny_bert, n=4)
    sess = exporters.load(arts[("onnx", "fp32")].path)
    batched = sess.run({"input_ids": ids[:, :40], "attention_mask": mask[:, :40]})["embeddings"]
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(ids[:, :40]), torch.from_numpy(mask[:, :40])).numpy()
    np.testing.assert_allclose(batched, ref, atol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
def test_classifier_exports_logits(tiny_roberta_classifier, tmp_path, fmt):
    loaded = load_model(tiny_roberta_classifier)
    assert loaded.kind == "classifier" and loaded.labels == ["negative", "positive", "neutral"]
    art = _export(loaded, fmt, FP32, tmp_path / f"c{exporters.suffix(fmt)}")
    ids, mask = _inputs(tiny_roberta_classifier, n=6)
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    session = exporters.load(art.path)
    # every format's session names its output as the artifact's signature says
    assert session.output_names == ["logits"] == [t.name for t in art.outputs]
    out = _run_rows(session, ids, mask)
    assert out.shape == (6, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_bert_classifier_uses_pooler(tiny_classifier):
    import transformers

    loaded = load_model(tiny_classifier)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    ids, mask = _inputs(tiny_classifier, n=4)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        ours = loaded.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_schemes_a_format_cannot_do(exported, tmp_path):
    loaded, _ = exported
    with pytest.raises(exporters.UnsupportedQuantError, match="unknown quantization scheme"):
        QuantSpec("int3")
    with pytest.raises(exporters.UnsupportedQuantError, match="embedding tables"):
        _export(loaded, "tflite", QuantSpec("int8_dynamic", embedding_bits=None), tmp_path / "x.tflite")


@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tflite"])
def test_corrupt_and_missing_artifacts(tmp_path, fmt):
    bad = tmp_path / f"bad{exporters.suffix(fmt)}"
    bad.write_bytes(b"definitely not a model" * 10)
    with pytest.raises(exporters.ArtifactLoadError):
        exporters.load(bad)
    with pytest.raises(exporters.ArtifactLoadError, match="not found"):
        exporters.load(tmp_path / f"missing{exporters.suffix(fmt)}")
    with pytest.raises(exporters.ArtifactLoadError, match="unknown artifact type"):
        exporters.load(tmp_path / "model.bin")


def test_runtime_side_imports_no_torch(exported, tmp_path):
    """The target script runs ONNX and TFLite artifacts without importing torch (what a board runs)."""
    _, arts = exported
    ids = np.ones((2, 10), np.int64)
    np.savez(
        tmp_path / "g.npz", input_ids=ids, attention_mask=ids, latency_input_ids=ids[:1], latency_attention_mask=ids[:1]
    )
    for fmt in ("onnx", "tflite"):
        out = tmp_path / fmt
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgelm.validate.target",
                str(arts[(fmt, "int8_dynamic")].path),
                "--golden",
                str(tmp_path / "g.npz"),
                "--out",
                str(out),
                "--runs",
                "3",
                "--warmup",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        assert code.returncode == 0, code.stderr
        result = json.loads((out / "result.json").read_text())
        assert result["torch_imported"] is False
        assert len(result["latency_samples_ms"]) == 3 and result["peak_rss_mb"] < 1000
        assert np.load(out / "outputs.npy").shape == (2, 64)


def test_formats_are_typed_plugins(tmp_path):
    """Each registered format satisfies the Format protocol, says why it refuses a scheme, and takes typed
    options: a misspelt option is an error, not silently swallowed."""
    from exporters.base import SCHEMES, Format

    assert exporters.formats() == ["onnx", "executorch", "tflite"]
    for name in exporters.formats():
        fmt = exporters.get(name)
        assert isinstance(fmt, Format) and fmt.name == name
        assert set(fmt.schemes) | set(fmt.unsupported) == set(SCHEMES)  # every scheme: supported or a reason
    assert "cosine 0.64" in exporters.get("tflite").unsupported["int8_static"]
    with pytest.raises(TypeError):
        exporters.ExportOptions(output_nmae="logits")
    with pytest.raises(exporters.ExporterError, match="does not implement"):

        @exporters.register
        class NotAFormat:
            name = "x"


def test_executorch_delegates_the_whole_encoder_to_xnnpack(tiny_classifier):
    """ExecuTorch 1.5's XNNPACK partitioner has no LayerNorm and no reshape with a symbolic length; edgelm's
    rewrites leave no LayerNorm, expand or symbolic view outside the delegate, with PyTorch's numbers."""
    import copy

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from exporters.executorch import _xnnpack_rewrites

    loaded = load_model(tiny_classifier)
    ids, mask = _inputs(tiny_classifier)
    args = (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1]))
    seq = torch.export.Dim("seq", min=2, max=SEQ)

    def outside_delegate(module):
        ep = torch.export.export(module, args, dynamic_shapes=({1: seq}, {1: seq}))
        lowered = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).exported_program()
        names = [getattr(n.target, "__name__", str(n.target)) for n in lowered.graph.nodes if n.op == "call_function"]
        return [n for n in names if n.startswith("aten.") and n.split(".")[1] in ("native_layer_norm", "expand_copy")]

    assert outside_delegate(loaded.module)  # as Hugging Face's code exports: LayerNorms and copies outside
    rewritten = copy.deepcopy(loaded.module).eval()
    assert _xnnpack_rewrites(rewritten) == {"layer_norms": 5, "attention_layers": 2}  # embeddings + 2 per layer
    assert outside_delegate(rewritten) == []
    with torch.no_grad():
        for i in range(len(ids)):
            n = int(mask[i].sum())
            a = (torch.from_numpy(ids[i : i + 1, :n]), torch.from_numpy(mask[i : i + 1, :n]))
            assert torch.allclose(rewritten(*a), loaded.module(*a), atol=1e-5)
            padded = (torch.from_numpy(ids[i : i + 1]), torch.from_numpy(mask[i : i + 1]))  # the mask matters
            assert torch.allclose(rewritten(*padded), loaded.module(*padded), atol=1e-5)
            assert n == SEQ or not torch.allclose(rewritten(*padded), rewritten(padded[0], torch.ones_like(padded[1])))
