"""`edgelm export --bundle android` (the demo app's assets) and the app's plain-JVM core, tested with the JDK
(examples/android/jvm-test.sh: token ids identical to Hugging Face on every SST-2 dev sentence, manifest
parsing, checksum failures, golden comparison, and the results JSON read back by edgelm)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

import exporters
from edgelm.cli import app

ROOT = Path(__file__).resolve().parents[1]
cli = CliRunner()


def test_android_bundle_holds_what_the_app_needs(pixel8_bundle):
    d = pixel8_bundle / "android" / "edgelm"
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema"] == "edgelm-android-bundle/1" and m["device"]["name"] == "pixel8"
    assert m["model"] == {**m["model"], "kind": "classifier", "output": "logits"} and m["labels"] == [
        "negative",
        "positive",
    ]
    assert json.loads((d / "labels.json").read_text()) == ["negative", "positive"]
    tok = m["tokenizer"]
    assert tok["type"] == "wordpiece" and tok["lowercase"] is True and tok["strip_accents"] is True  # HF default
    assert (
        tok["max_length"] == 32
        and tok["cls_token"] == "[CLS]"
        and tok["vocab_sha256"] == exporters.sha256_file(d / "vocab.txt")
    )
    assert [a["runtime"] for a in m["artifacts"]] == ["executorch", "litert", "onnxruntime"]
    with np.load(d / "golden.npz") as z:
        ref_range = float(z["reference"].max() - z["reference"].min())
        assert len(z["texts"]) == 24 and z["labels"].shape == (24,)
    main = json.loads((pixel8_bundle / "manifest.json").read_text())
    for a, ref in zip(m["artifacts"], main["artifacts"], strict=False):
        assert a["sha256"] == exporters.sha256_file(d / a["file"]) == ref["sha256"]
        assert a["tolerance"]["max_abs_error"] == pytest.approx(0.25 * ref_range)  # int8 dynamic: 25% of the range
        # a classifier is judged by top-1 agreement and accuracy drop, not by the cosine of its logits
        assert a["tolerance"]["min_cosine"] is None and a["tolerance"]["min_top1_agreement"] == 0.95
        assert a["inputs"] == ref["inputs"]
    tfl = next(a for a in m["artifacts"] if a["runtime"] == "litert")
    assert tfl["seq_buckets"] == [16, 32] and tfl["inputs"][0]["dtype"] == "int32"
    assert m["golden"]["sha256"] == exporters.sha256_file(d / "golden.npz") and m["golden"]["labeled"] is True


def test_android_bundle_refuses_a_tokenizer_the_app_cannot_run(tiny_roberta_classifier, tmp_path):
    """A byte-level BPE tokenizer (RoBERTa's kind) is not WordPiece: refused before any export work."""
    from tokenizers import ByteLevelBPETokenizer

    from edgelm.data import PROBE_SENTENCES

    model = tmp_path / "bpe-model"
    shutil.copytree(tiny_roberta_classifier, model)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(PROBE_SENTENCES, vocab_size=300, min_frequency=1)
    bpe.save(str(model / "tokenizer.json"))
    out = tmp_path / "dist"
    r = cli.invoke(
        app,
        [
            "export",
            "--device",
            "pixel8",
            "--model",
            str(model),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--bundle",
            "android",
        ],
    )
    assert r.exit_code == 2 and "WordPiece" in r.output and not out.exists()
    r = cli.invoke(app, ["export", "--device", "pixel8", "--out", str(out), "--bundle", "ios"])
    assert r.exit_code == 2 and "unknown --bundle 'ios'" in r.output and not out.exists()


@pytest.mark.skipif(shutil.which("javac") is None, reason="no JDK: apt-get install default-jdk-headless")
def test_jvm_core_with_the_jdk():
    """examples/android/jvm-test.sh as CI runs it."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "android" / "jvm-test.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "OK " in out and ", 0 failed" in out and "edgelm and the JVM core agree" in out
    compared = int(out.split(" texts compared with Hugging Face tokenizers")[0].split()[-1])
    if (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        assert compared >= 872 + 300  # every SST-2 dev sentence, MRPC pairs at two lengths, the hard cases
    assert " texts compared with Hugging Face tokenizers, 0 differ" in out
    # the byte-level BPE (text generation) against Hugging Face, and the generation check read back by edgelm
    bpe = re.search(r"trained-sst2: (\d+) texts \(.*\): encode differs 0, decode differs 0", out)
    assert bpe, out[-4000:]
    if (SHARED_DATA / "wikitext2" / "raw" / "wiki.test.raw").is_file() and (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        assert int(bpe.group(1)) == 2891 + 872 + 26 + 32  # WikiText-2 test lines, SST-2 dev, hard cases, prompts
    assert "token_agreement: edgelm 0.125000, JVM 0.125000" in out
    assert "edgelm and the JVM core agree (generation)" in out
