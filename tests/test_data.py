import json

import numpy as np
import pytest
from conftest import SHARED_DATA

from edgelm.data import PROBE_SENTENCES, encode, label_indices, load_dataset, load_tokenizer, probe_dataset
from edgelm.errors import DataError
from edgelm.models import default_model_dir


def test_probe_sentences_vary_in_length():
    assert len(PROBE_SENTENCES) >= 64 and len(set(PROBE_SENTENCES)) == len(PROBE_SENTENCES)
    tok = load_tokenizer(default_model_dir(), 128)
    ids, mask = encode(tok, probe_dataset())
    lengths = mask.sum(1)
    assert ids.shape == (len(PROBE_SENTENCES), 128) and ids.dtype == np.int64
    assert lengths.min() <= 5 and lengths.max() == 128  # the longest are truncated at seq_len
    assert len(set(lengths.tolist())) > 30


def test_tokenizer_matches_hugging_face():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(default_model_dir())
    ours = load_tokenizer(default_model_dir(), 64)
    texts = [*list(PROBE_SENTENCES[:20]), "Crème brûlée, naïve café!"]
    ids, mask = encode(ours, probe_dataset().__class__(texts=texts))
    ref = hf(texts, padding="max_length", max_length=64, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_tsv_csv_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nit's \"great\t1\nbad\t0\n")
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",positive\nbye,negative\n')
    (tmp_path / "a.jsonl").write_text(json.dumps({"premise": "p1", "hypothesis": "h1", "label": 2}) + "\n")
    d = load_dataset(tmp_path / "a.tsv")
    assert d.texts == ["it's \"great", "bad"] and d.labels == ["1", "0"]
    d = load_dataset(tmp_path / "a.csv")
    assert d.texts == ["hello, world", "bye"]
    assert label_indices(d.labels, ["negative", "positive"]).tolist() == [1, 0]
    d = load_dataset(tmp_path / "a.jsonl")
    assert d.texts == ["p1"] and d.pairs == ["h1"] and d.labels == [2]


@pytest.mark.parametrize(
    "content, suffix, msg",
    [
        ("foo\tbar\nx\ty\n", ".tsv", "no text column"),
        ("", ".tsv", "empty"),
        ("[1, 2]\n", ".jsonl", "JSON object"),
        ("text\n", ".tsv", "no data rows"),
        ("x", ".parquet", "unknown data format"),
    ],
)
def test_bad_data_files(tmp_path, content, suffix, msg):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(DataError, match=msg):
        load_dataset(f)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.tsv")
    (tmp_path / "b.tsv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(tmp_path / "b.tsv")


def test_bad_labels():
    with pytest.raises(DataError, match="not a class index"):
        label_indices(["maybe"], ["negative", "positive"])
    with pytest.raises(DataError, match="out of range"):
        label_indices(["5"], ["negative", "positive"])


@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "dev.tsv").exists(), reason="../shared/data/sst2 is absent")
def test_real_glue_files():
    d = load_dataset(SHARED_DATA / "sst2" / "dev.tsv")
    assert len(d) == 872 and set(d.labels) == {"0", "1"}
    m = load_dataset(SHARED_DATA / "mrpc" / "dev.tsv", text_column="#1 String", label_column="Quality")
    assert len(m) == 408
    q = load_dataset(SHARED_DATA / "qnli" / "dev.tsv")
    assert len(q) == 5463 and q.pairs is not None and q.labels[0] == "entailment"
