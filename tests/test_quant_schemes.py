"""The quantization schemes beyond int8 dynamic, per format, in the real runtimes on a tiny classifier:
static int8 with calibration and float layers, 8da4w / int4, fp16; and the clear refusals."""

import numpy as np
import pytest
import torch

import exporters
from edgelm.data import encode, load_tokenizer, probe_dataset
from edgelm.models import load_model
from edgelm.pipeline import calibration_rows
from edgelm.schemes import quant_spec
from exporters import QuantSpec

SEQ = 32


@pytest.fixture(scope="module")
def setup(tiny_classifier):
    loaded = load_model(tiny_classifier)
    tok = load_tokenizer(loaded.tokenizer_dir, SEQ)
    ids, mask = encode(tok, probe_dataset())
    with torch.no_grad():
        ref = loaded.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return loaded, ids, mask, ref


def _export_and_run(setup, fmt, quant, path):
    loaded, ids, mask, _ = setup
    example = {
        "input_ids": torch.ones(1, SEQ, dtype=torch.int64),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
    }
    art = exporters.get(fmt).export(
        loaded.module,
        example,
        quant,
        path,
        exporters.ExportOptions(output_name=loaded.output_name, calibration=calibration_rows(ids, mask, 16)),
    )
    out = next(iter(exporters.load(art.path, threads=1).run({"input_ids": ids, "attention_mask": mask}).values()))
    return art, out


def _cos(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


@pytest.mark.parametrize(
    "fmt,scheme,min_cos",
    [
        ("onnx", "int8_static", 0.95),
        ("executorch", "int8_static", 0.95),
        ("onnx", "8da4w", 0.9),
        ("executorch", "8da4w", 0.85),
        ("onnx", "int4_weight_only", 0.9),
        ("onnx", "fp16", 0.999),
        ("tflite", "fp16", 0.999),
    ],
)
def test_scheme_runs_and_stays_close(setup, tmp_path, fmt, scheme, min_cos):
    art, out = _export_and_run(setup, fmt, quant_spec(scheme), tmp_path / f"m.{scheme}{exporters.suffix(fmt)}")
    ref = setup[3]
    assert out.shape == ref.shape
    assert _cos(out, ref) >= min_cos
    if scheme != "fp16":  # an int8/int4 graph is not bit-identical to fp32
        assert np.abs(out - ref).max() > 1e-6
    if scheme == "int8_static":
        kept = art.details["float_linear_layers"]
        # the FFN down-projections and the head (pooler, classifier) stay float: logits are never quantized
        assert len(kept) == 4 and sorted(k.split(".")[-1] for k in kept)[:2] == ["classifier", "dense"]
        assert sum(k.endswith("output.dense") and "attention" not in k for k in kept) == 2
        dynamic, _ = _export_and_run(setup, fmt, quant_spec("int8_dynamic"), tmp_path / f"d{exporters.suffix(fmt)}")
        fp32, _ = _export_and_run(setup, fmt, quant_spec("fp32"), tmp_path / f"f{exporters.suffix(fmt)}")
        # the other Linear layers really are int8: far closer to the dynamic artifact's size than to fp32's
        assert art.size_bytes < dynamic.size_bytes + 0.5 * (fp32.size_bytes - dynamic.size_bytes)


def test_static_keeps_more_layers_float_on_request(setup, tmp_path):
    q = quant_spec("int8_static", ("ffn_output", "attention_output"))
    art, _ = _export_and_run(setup, "onnx", q, tmp_path / "m.onnx")
    assert len(art.details["float_linear_layers"]) == 4
    assert art.details["quantized_linear_nodes"] == 14 - 4  # 6 Linear per layer x 2 + pooler + classifier, minus 4


def test_onnx_int8_dynamic_scales_each_token(setup, tmp_path):
    """ONNX int8 dynamic quantizes activations per token: a sentence's logits do not depend on what else is in
    the batch. onnxruntime's quantize_dynamic (one scale per activation tensor) on the same graph fails this."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    art, _ = _export_and_run(setup, "onnx", quant_spec("int8_dynamic"), tmp_path / "a.onnx")
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert ops.count("MatMulInteger") == art.details["quantized_linear_nodes"] == 14  # every Linear
    assert "DynamicQuantizeLinear" not in ops and ops.count("Gather") >= 2 * 3  # int8 rows + their scales
    _, ids, mask, _ = setup
    loud = ids.copy()
    loud[1, 1:] = ids[5, 1:]  # another sentence beside the first one
    pair = {"input_ids": loud[:2], "attention_mask": np.maximum(mask[:2], mask[5:6])}
    alone = {"input_ids": loud[:1], "attention_mask": pair["attention_mask"][:1]}

    def first_row(path):
        sess = exporters.load(path, threads=1)
        return sess.run(pair)["logits"][0], sess.run(alone)["logits"][0]

    in_pair, by_itself = first_row(art.path)
    assert np.abs(in_pair - by_itself).max() < 1e-5
    fp32, _ = _export_and_run(setup, "onnx", quant_spec("fp32"), tmp_path / "f.onnx")
    quantize_dynamic(str(fp32.path), str(tmp_path / "t.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    in_pair, by_itself = first_row(tmp_path / "t.onnx")
    assert np.abs(in_pair - by_itself).max() > 1e-4


def test_int4_is_smaller_than_int8(setup, tmp_path):
    int8, _ = _export_and_run(setup, "onnx", quant_spec("int8_dynamic"), tmp_path / "a.onnx")
    int4, _ = _export_and_run(setup, "onnx", quant_spec("8da4w"), tmp_path / "b.onnx")
    fp16, _ = _export_and_run(setup, "onnx", quant_spec("fp16"), tmp_path / "c.onnx")
    fp32, _ = _export_and_run(setup, "onnx", quant_spec("fp32"), tmp_path / "d.onnx")
    assert int4.size_bytes < int8.size_bytes < fp16.size_bytes < fp32.size_bytes


@pytest.mark.parametrize(
    "fmt,scheme,reason",
    [
        ("executorch", "fp16", "GPU delegates"),
        ("executorch", "int4_weight_only", "use 8da4w"),
        ("tflite", "int8_static", "cosine 0.64"),
        ("tflite", "int4_weight_only", "use 8da4w"),
    ],
)
def test_schemes_a_format_cannot_do_say_why(setup, tmp_path, fmt, scheme, reason):
    with pytest.raises(exporters.UnsupportedQuantError, match=reason):
        _export_and_run(setup, fmt, quant_spec(scheme), tmp_path / f"m{exporters.suffix(fmt)}")
    assert not (tmp_path / f"m{exporters.suffix(fmt)}").exists()


def test_static_needs_calibration(setup, tmp_path):
    loaded = setup[0]
    example = {
        "input_ids": torch.ones(1, SEQ, dtype=torch.int64),
        "attention_mask": torch.ones(1, SEQ, dtype=torch.int64),
    }
    with pytest.raises(exporters.UnsupportedQuantError, match="calibration"):
        exporters.get("onnx").export(loaded.module, example, quant_spec("int8_static"), tmp_path / "m.onnx")


def test_quantspec_validates_groups():
    with pytest.raises(exporters.UnsupportedQuantError, match="layer group"):
        QuantSpec("int8_static", float_layers=("everything",))
    with pytest.raises(exporters.UnsupportedQuantError, match="group_size"):
        QuantSpec("8da4w", group_size=7)
    assert quant_spec("int8_static").label == "int8_static (float: ffn_output+head)"


def test_onnx_int8_dynamic_matmul_is_exact_integer_arithmetic():
    """The per-token int8 MatMul computes exactly the integer product its docstring states, on this CPU too:
    uint8 x int8 in ONNX Runtime's x86 kernels without VNNI saturates pairs of products at 16 bits (int32
    sums off by up to 7e4 here, on an AVX2-only host), uint8 x uint8 does not. Weights and activations at
    full scale so that the saturating pairs occur."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx import _per_token_int8

    rng = np.random.default_rng(0)
    k, n = 384, 64
    w = rng.uniform(-1, 1, (k, n)).astype(np.float32)
    x = rng.uniform(-1, 1, (6, k)).astype(np.float32)
    x[:, 0] = 1.0  # every token reaches +127, so its uint8 code reaches 255
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    assert _per_token_int8(model, {"linear"}) == 1
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w_codes = inits["linear.weight_uint8"].astype(np.int64) - 128
    w_scale = inits["linear.weight_scale"].astype(np.float32)
    s = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127
    x_codes = np.round(x / s).astype(np.int64)
    assert np.abs(x_codes).max() == 127 and np.abs(w_codes).max() == 127
    want = (x_codes @ w_codes).astype(np.float32) * w_scale * s
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert np.abs(got - x @ w).max() < 0.02 * np.abs(x @ w).max()  # and it is still the float product, quantized
    assert onnx.checker.check_model(model) is None
