"""Tiny random-config checkpoints (BERT or RoBERTa, embedding model or classifier) with a real WordPiece
tokenizer over the probe sentences' words: what edgelm's tests, and examples/android/jvm-test.sh, export in
seconds instead of a real model. Needs torch and transformers (the SDK side)."""

from __future__ import annotations

import json
import re
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab() -> list[str]:
    from edgelm.data import PROBE_SENTENCES

    words = sorted({w for s in PROBE_SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return SPECIALS + list("abcdefghijklmnopqrstuvwxyz0123456789") + pieces + words


def make_checkpoint(
    directory: Path,
    *,
    kind: str = "embedding",
    model_type: str = "bert",
    num_labels: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny random checkpoint to ``directory``: config.json, model.safetensors (``hidden`` wide,
    ``layers`` deep, ``heads`` heads; ``kind`` "embedding" or "classifier" with ``num_labels`` classes named
    negative/positive/neutral), tokenizer.json, vocab.txt (~800 WordPiece tokens) and tokenizer_config.json.
    Returns ``directory``."""
    import torch
    import transformers
    from tokenizers.implementations import BertWordPieceTokenizer

    torch.manual_seed(seed)
    vocab = _vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    common = dict(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=130 if model_type == "roberta" else 128,
    )
    if model_type == "bert":
        config = transformers.BertConfig(**common)
        cls = transformers.BertForSequenceClassification if kind == "classifier" else transformers.BertModel
    else:
        config = transformers.RobertaConfig(**common, pad_token_id=0)
        cls = transformers.RobertaForSequenceClassification if kind == "classifier" else transformers.RobertaModel
    if kind == "classifier":
        config.num_labels = num_labels
        config.id2label = {i: ["negative", "positive", "neutral"][i] for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = cls(config).eval()
    model.save_pretrained(directory)
    tok = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "pad_token": "[PAD]"}))
    return directory
