import pytest

from edgelm.errors import RecipeError
from edgelm.profiles import load_profile
from edgelm.recipe import make_recipe


def test_pixel8_default_recipe():
    r = make_recipe(load_profile("pixel8"))
    assert [p.format for p in r.plans] == ["executorch", "tflite", "onnx"]
    assert all(p.quant.scheme == "int8_dynamic" and p.quant.embedding_bits == 8 for p in r.plans)
    assert r.seq_len == 128 and r.threads == 4 and r.batch == 1
    assert {p.delegate for p in r.plans} == {"xnnpack", "CPUExecutionProvider"}
    g = r.plans[0].gates
    assert (g.min_cosine, g.max_accuracy_drop, g.max_size_mb) == (0.99, 1.0, 128)
    d = r.to_dict()
    assert d["plans"][0]["artifact"] == "model.int8_dynamic.pte"


def test_overrides():
    p = load_profile("pixel8")
    r = make_recipe(p, formats=["onnx", "tflite"], quant="fp32", seq_len=64, threads=1)
    assert [(x.format, x.quant.scheme, x.quant.embedding_bits) for x in r.plans] == [
        ("onnx", "fp32", None),
        ("tflite", "fp32", None),
    ]
    assert r.seq_len == 64 and r.threads == 1
    assert r.plans[0].gates.min_cosine == 0.9999
    r = make_recipe(p, quant="onnx=fp32,tflite=int8_dynamic")
    assert {x.format: x.quant.scheme for x in r.plans} == {
        "executorch": "int8_dynamic",
        "tflite": "int8_dynamic",
        "onnx": "fp32",
    }


def test_profile_without_a_format_still_takes_it_when_asked():
    r = make_recipe(load_profile("raspberry-pi-zero-2w"))
    assert [p.format for p in r.plans] == ["tflite", "onnx"]
    assert r.seq_len == 64  # the length the profile states its latency budget at
    r = make_recipe(load_profile("raspberry-pi-zero-2w"), formats=["executorch"])
    assert r.plans[0].format == "executorch" and r.plans[0].gates.max_size_mb == 32


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"quant": "int3"}, "cannot do quantization 'int3'"),
        ({"formats": ["coreml"]}, "unknown format 'coreml'"),
        ({"quant": "coreml=fp32"}, "not among the formats"),
        ({"quant": "onnx="}, "FORMAT=SCHEME"),
        ({"seq_len": 1}, "out of range"),
        ({"threads": 0}, "use 1 or more"),
    ],
)
def test_bad_overrides(kwargs, msg):
    with pytest.raises(RecipeError, match=msg):
        make_recipe(load_profile("pixel8"), **kwargs)


def test_recipe_is_pure():
    p = load_profile("galaxy-s24")
    assert make_recipe(p, quant="fp32") == make_recipe(p, quant="fp32")
    # galaxy-s24 prefers QNN for ExecuTorch, which edgelm cannot lower to: the first one it can is chosen
    assert make_recipe(p).plans[0].delegate == "xnnpack"


def test_new_schemes_in_the_recipe():
    p = load_profile("pixel8")
    r = make_recipe(p, quant="onnx=int8_static,executorch=8da4w,tflite=fp16", sparsity=0.3, max_accuracy_drop=0.5)
    plans = {x.format: x for x in r.plans}
    assert plans["onnx"].quant.float_layers == ("ffn_output", "head") and plans["onnx"].gates.min_cosine == 0.95
    assert plans["executorch"].quant.group_size == 32 and plans["executorch"].quant.embedding_bits == 8
    assert plans["tflite"].quant.embedding_bits is None and plans["tflite"].gates.min_cosine == 0.999
    assert all(x.gates.max_accuracy_drop == 0.5 for x in r.plans) and r.sparsity == 0.3
    with pytest.raises(RecipeError, match="GPU delegates"):
        make_recipe(p, quant="executorch=fp16")
    with pytest.raises(RecipeError, match=r"cosine 0\.64"):
        make_recipe(p, quant="tflite=int8_static")
    with pytest.raises(RecipeError, match="--prune"):
        make_recipe(p, sparsity=1.0)


def test_profile_compression_table(tmp_path):
    from edgelm.errors import ProfileError
    from edgelm.profiles import profiles_dir

    text = (profiles_dir() / "pixel8.toml").read_text()
    path = tmp_path / "p.toml"
    path.write_text(text + "\n[compression]\nsparsity = 0.3\n")
    assert make_recipe(load_profile(path)).sparsity == 0.3
    assert make_recipe(load_profile(path), sparsity=0.0).sparsity == 0.0
    path.write_text(text + "\n[compression]\nsparsity = 1.5\n")
    with pytest.raises(ProfileError, match=r"compression\.sparsity"):
        load_profile(path)
