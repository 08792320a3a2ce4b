"""App bundles: what `edgelm export --bundle android` adds to ``dist/<device>/``.

``dist/<device>/android/edgelm/`` holds what the Android demo app (``examples/android``) loads from its
assets: the artifacts it can run (ExecuTorch ``.pte``, LiteRT ``.tflite``, ONNX ``.onnx`` with their companion
files), the WordPiece vocabulary (``vocab.txt``) with the tokenizer's settings, the class names, the golden
set (``golden.npz``: token ids, PyTorch fp32 reference outputs, texts and labels) and ``manifest.json``
(:data:`ANDROID_SCHEMA`): per artifact its runtime, sha256, size, input/output signature (names, dtypes, shapes,
sequence buckets) and golden tolerance. The app's build takes the folder as an asset source
(``-Pedgelm.bundle=.../android``), or it is copied to ``app/src/main/assets/``.

No torch: it reads a finished export bundle (through :class:`edgelm.validate.bundle.Bundle`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import edgelm
import exporters
from edgelm import tasks
from edgelm.bundle import Bundle, android_assets
from edgelm.errors import ExportError

ANDROID_SCHEMA = "edgelm-android-bundle/1"
BUNDLE_KINDS = ("android",)


def wordpiece_settings(directory: Path, max_length: int) -> dict:
    """The tokenizer settings the app's WordPiece tokenizer needs, read from ``tokenizer.json`` (the Hugging
    Face ``tokenizers`` file: BertNormalizer, BertPreTokenizer, WordPiece, [CLS] A [SEP] (B [SEP])), or from
    ``vocab.txt`` + ``tokenizer_config.json``. Raises ExportError for a tokenizer that is not BERT WordPiece."""
    tj = directory / "tokenizer.json"
    cfg_file = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if tj.is_file():
        tok = json.loads(tj.read_text(encoding="utf-8"))
        model, norm = tok.get("model") or {}, tok.get("normalizer") or {}
        if model.get("type") != "WordPiece" or norm.get("type") != "BertNormalizer":
            raise ExportError(
                f"--bundle android: the demo app tokenizes with BERT WordPiece, but this model's "
                f"tokenizer is {model.get('type')} with {norm.get('type')} (e.g. RoBERTa's BPE); export "
                "it without --bundle android and tokenize in the app yourself"
            )
        lowercase = bool(norm.get("lowercase", True))
        settings = {
            "lowercase": lowercase,
            "strip_accents": norm.get("strip_accents"),
            "clean_text": bool(norm.get("clean_text", True)),
            "handle_chinese_chars": bool(norm.get("handle_chinese_chars", True)),
            "unk_token": model.get("unk_token", "[UNK]"),
            "continuing_subword_prefix": model.get("continuing_subword_prefix", "##"),
            "max_input_chars_per_word": int(model.get("max_input_chars_per_word", 100)),
        }
    else:
        settings = {
            "lowercase": bool(cfg.get("do_lower_case", True)),
            "strip_accents": cfg.get("strip_accents"),
            "clean_text": True,
            "handle_chinese_chars": bool(cfg.get("tokenize_chinese_chars", True)),
            "unk_token": cfg.get("unk_token", "[UNK]"),
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
        }
    if settings["strip_accents"] is None:  # Hugging Face: accents are stripped when lower-casing unless told
        settings["strip_accents"] = settings["lowercase"]
    vocab = directory / "vocab.txt"
    if not vocab.is_file():
        raise ExportError("--bundle android needs the WordPiece vocabulary (vocab.txt) beside the model")
    words = vocab.read_text(encoding="utf-8").splitlines()
    specials = {
        k: cfg.get(k) if isinstance(cfg.get(k), str) else d
        for k, d in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"))
    }
    for token in (*specials.values(), settings["unk_token"]):
        if token not in words:
            raise ExportError(f"--bundle android: special token {token} is not in vocab.txt")
    return {
        "type": "wordpiece",
        "vocab": "vocab.txt",
        **settings,
        **specials,
        "max_length": int(max_length),
        "truncation": "longest_first",
        "padding": "right, to max_length",
        "vocab_size": len(words),
    }


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


#: The recipe gates the app's golden comparison reads from the manifest (beside ``max_abs_error``).
TOLERANCE_GATES = ("min_cosine", "min_top1_agreement", "max_accuracy_drop")


def write_android_bundle(bundle_dir: Path) -> Path:
    """Write :func:`android_assets` from a finished export bundle (its manifest.json, golden.npz, tokenizer
    files, labels and artifacts; each artifact's gates from the manifest's recipe). Returns the asset folder.
    Raises ExportError (not a WordPiece tokenizer)."""
    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    out = android_assets(bundle.path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = wordpiece_settings(bundle.path, manifest.tokenizer.max_length)
    _link_or_copy(bundle.file("vocab.txt"), out / "vocab.txt")
    tokenizer["vocab_sha256"] = exporters.sha256_file(out / "vocab.txt")
    golden_file = manifest.golden.file
    _link_or_copy(bundle.file(golden_file), out / golden_file)
    task = tasks.for_kind(manifest.model.kind)
    artifacts = []
    for a in manifest.artifacts:
        g = bundle.plan(a.file).gates
        scheme = a.quantization.scheme
        for f in [a.file] + [c.file for c in a.companions]:
            _link_or_copy(bundle.file(f), out / f)
        artifacts.append(
            {
                "file": a.file,
                "format": a.format,
                "runtime": exporters.get(a.format).app_runtime,
                "scheme": scheme,
                "sha256": a.sha256,
                "size_bytes": a.size_bytes,
                "inputs": [t.model_dump() for t in a.inputs],
                "outputs": [t.model_dump() for t in a.outputs],
                "max_seq_len": a.details.get("max_seq_len", manifest.tokenizer.max_length),
                "seq_buckets": a.details.get("seq_buckets"),
                "companions": [c.model_dump() for c in a.companions],
                "golden_reference": a.golden_reference,
                # the task's gates only (null: not judged; a classifier has no cosine gate)
                "tolerance": {
                    **{k: getattr(g, k) if k in task.gates else None for k in TOLERANCE_GATES},
                    "max_abs_error": tasks.max_abs_error(task, scheme, bundle.reference(a.file)),
                },
                "reference_accuracy": bundle.baseline_accuracy,
            }
        )
    labels = manifest.labels
    if labels:
        (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    doc = {
        "schema": ANDROID_SCHEMA,
        "edgelm_version": edgelm.__version__,
        "created": manifest.created,
        "device": {"name": manifest.device.name, "display_name": manifest.device.display_name},
        "model": {k: getattr(manifest.model, k, None) for k in ("kind", "output", "model_type", "source")},
        "labels": labels,
        "threads": manifest.recipe.threads,
        "tokenizer": tokenizer,
        "golden": {
            "file": golden_file,
            "sha256": manifest.golden.sha256,
            "count": manifest.golden.count,
            "labeled": "labels" in bundle.golden,
            "source": manifest.golden.source,
        },
        "artifacts": artifacts,
    }
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out
