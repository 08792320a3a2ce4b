"""App bundles: what `edgelm export --bundle android` adds to ``dist/<device>/``.

``dist/<device>/android/edgelm/`` holds what the Android demo app (``examples/android``) loads from its
assets: the artifacts it can run (ExecuTorch ``.pte``, LiteRT ``.tflite``, ONNX ``.onnx`` with their companion
files), the WordPiece vocabulary (``vocab.txt``) with the tokenizer's settings, the class names, the golden
set (``golden.npz``: token ids, PyTorch fp32 reference outputs, texts and labels) and ``manifest.json``
(:data:`ANDROID_SCHEMA`): per artifact its runtime, sha256, size, input/output signature (names, dtypes, shapes,
sequence buckets) and golden tolerance. An early-exit cascade (``*.exits.json``) comes with its segment
artifacts and its exit policy in its manifest entry (``cascade``: confidence measure, threshold, segments), which
the app runs in order, stopping at the first confident exit. The app's build takes the folder as an asset source
(``-Pedgelm.bundle=.../android``), or it is copied to ``app/src/main/assets/``.

A text-generation bundle (:func:`write_generative_android_bundle`) carries the decoders the app runs
(ExecuTorch ``.pte`` through ``LlmModule`` and ``Module``, LiteRT ``.tflite`` through its interpreter's
signatures), ``tokenizer.json`` (byte-level BPE: the app's own tokenizer and ``LlmModule``'s read it), the
golden set (prompt token ids, reference greedy tokens, the perplexity window), ``prompts.json`` (the golden
prompts as text, the reference continuations decoded, the chat template's prefix and suffix around a user
message) and ``tokenizer_cases.json`` (texts with Hugging Face's ids, for the on-device tokenizer check).

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
from exporters.cascade import SCHEMA as cascade_schema
from exporters.cascade import Cascade, is_cascade

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


def _app_artifact(bundle: Bundle, a, out: Path, runtime: str) -> dict:
    """Link artifact ``a`` and its companion files into the app folder ``out``; its manifest fields every kind
    of bundle shares (file, format, runtime, scheme, sha256, size, signature, companions, golden reference)."""
    for f in [a.file] + [c.file for c in a.companions]:
        _link_or_copy(bundle.file(f), out / f)
    return {
        "file": a.file,
        "format": a.format,
        "runtime": runtime,
        "scheme": a.quantization.scheme,
        "sha256": a.sha256,
        "size_bytes": a.size_bytes,
        "inputs": [t.model_dump() for t in a.inputs],
        "outputs": [t.model_dump() for t in a.outputs],
        "companions": [c.model_dump() for c in a.companions],
        "golden_reference": a.golden_reference,
    }


def _app_manifest_head(manifest, model_keys: tuple[str, ...]) -> dict:
    """The app manifest's first fields: schema, versions, device, the model's ``model_keys``, threads."""
    return {
        "schema": ANDROID_SCHEMA,
        "edgelm_version": edgelm.__version__,
        "created": manifest.created,
        "device": {"name": manifest.device.name, "display_name": manifest.device.display_name},
        "model": {k: getattr(manifest.model, k, None) for k in model_keys},
        "threads": manifest.recipe.threads,
    }


#: The recipe gates the app's golden comparison reads from the manifest (beside ``max_abs_error``).
TOLERANCE_GATES = ("min_cosine", "min_top1_agreement", "max_accuracy_drop")


def app_cascade(bundle: Bundle, name: str) -> dict | None:
    """The exit policy and segments of an early-exit cascade artifact ``name`` (``*.exits.json``) as the app's
    manifest carries them, None for a whole model: ``confidence`` (``max_prob`` or ``entropy``), ``threshold``,
    ``output_name``, ``num_layers`` and ``segments`` in order (file, sha256, first and last encoder layer,
    1-based; the app checks each file's sha256 before loading it, as it does the artifact's companions).
    Raises ArtifactLoadError for a description edgelm cannot read."""
    if not is_cascade(name):
        return None
    c = Cascade.read(bundle.file(name))
    return {
        "schema": cascade_schema,
        "confidence": c.confidence,
        "threshold": c.threshold,
        "output_name": c.output_name,
        "num_layers": c.num_layers,
        "exit_layers": c.exit_layers,
        "segments": [
            {"file": s.file, "sha256": s.sha256, "first_layer": s.first_layer, "last_layer": s.last_layer}
            for s in c.segments
        ],
    }


def write_android_bundle(bundle_dir: Path) -> Path:
    """Write :func:`android_assets` from a finished export bundle (its manifest.json, golden.npz, tokenizer
    files, labels and artifacts; each artifact's gates from the manifest's recipe). Returns the asset folder.
    A text-generation bundle goes to :func:`write_generative_android_bundle`.
    Raises ExportError (not a WordPiece tokenizer)."""
    bundle = Bundle.load(bundle_dir)
    if bundle.kind == tasks.TEXT_GENERATION.kind:
        return write_generative_android_bundle(bundle)
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
        cascade = app_cascade(bundle, a.file)
        # an early-exit cascade's signature is its first segment's (the others take hidden states)
        shape = a.details["segments"][0] if cascade else a.details
        entry = {
            **_app_artifact(bundle, a, out, exporters.get(a.format).app_runtime),
            "max_seq_len": shape.get("max_seq_len", manifest.tokenizer.max_length),
            "seq_buckets": shape.get("seq_buckets"),
            # the task's gates only (null: not judged; a classifier has no cosine gate); a cascade is judged
            # by top-1 agreement and accuracy: where a confidence moves across the threshold another exit
            # answers, whose logits differ by design (as edgelm validate judges it)
            "tolerance": {
                **{k: getattr(g, k) if k in task.gates else None for k in TOLERANCE_GATES},
                "max_abs_error": None if cascade else tasks.max_abs_error(task, scheme, bundle.reference(a.file)),
            },
            "reference_accuracy": bundle.baseline_accuracy,
        }
        if cascade:
            entry["cascade"] = cascade
        artifacts.append(entry)
    labels = manifest.labels
    if labels:
        (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    doc = {
        **_app_manifest_head(manifest, ("kind", "output", "model_type", "source")),
        "labels": labels,
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


#: Decoder formats the demo app runs, with the runtime it runs them on (the ONNX decoders need ONNX Runtime
#: GenAI's Android library, which the app does not carry).
APP_DECODER_RUNTIMES = {"executorch": "executorch", "tflite": "litert"}


def byte_level_bpe_settings(path: Path) -> dict:
    """Check that ``tokenizer.json`` is a tokenizer the app's byte-level BPE (``ByteLevelBpeTokenizer`` in
    examples/android/edgelm-core) implements exactly, and return its settings for the manifest: no normalizer,
    the pre-tokenizer ``ByteLevel`` (GPT-2's split regex, no prefix space), optionally after ``Digits``, a
    ``BPE`` model without byte fallback, dropout or subword affixes, the ``ByteLevel`` decoder, and added
    tokens matched as they are (no lstrip/rstrip/single-word). Raises ExportError naming what differs."""
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"--bundle android: cannot read {path.name}: {exc}") from None
    problems = []
    if tok.get("normalizer") is not None:
        problems.append(f"normalizer {tok['normalizer'].get('type')}")
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    digits = False
    if len(steps) == 2 and steps[0].get("type") == "Digits":
        digits = bool(steps[0].get("individual_digits"))
        steps = steps[1:]
    if not (
        len(steps) == 1
        and steps[0].get("type") == "ByteLevel"
        and steps[0].get("use_regex", True)
        and not steps[0].get("add_prefix_space", False)
    ):
        problems.append(f"pre-tokenizer {json.dumps(pre)[:120]}")
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')}")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"BPE {key}={model[key]!r}")
    if (tok.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append(f"decoder {(tok.get('decoder') or {}).get('type')}")
    for t in tok.get("added_tokens") or []:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            problems.append(f"added token {t.get('content')!r} with lstrip/rstrip/single_word")
            break
    if problems:
        raise ExportError(
            "--bundle android: the demo app's tokenizer is GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with "
            f"its regex, as SmolLM's tokenizer.json); this model's differs: {'; '.join(problems)}"
        )
    return {
        "type": "byte_level_bpe",
        "file": path.name,
        "sha256": exporters.sha256_file(path),
        "vocab_size": 1
        + max([*(model.get("vocab") or {}).values(), *(t["id"] for t in tok.get("added_tokens") or [])]),
        "individual_digits": digits,
        "ignore_merges": bool(model.get("ignore_merges", False)),
    }


def chat_affixes(rendered: str, message: str) -> dict:
    """The chat template around one user message, from a golden prompt rendered by the template:
    ``{"prefix", "suffix"}`` with ``prefix + message + suffix == rendered`` (both empty without a template)."""
    at = rendered.rfind(message)
    if at < 0:
        return {"prefix": "", "suffix": ""}
    return {"prefix": rendered[:at], "suffix": rendered[at + len(message) :]}


def write_generative_android_bundle(bundle: Bundle) -> Path:
    """The Android app's assets of a text-generation bundle (see the module doc): the decoders the app runs
    (:data:`APP_DECODER_RUNTIMES`), ``tokenizer.json``, ``golden.npz``, ``prompts.json``,
    ``tokenizer_cases.json`` and ``manifest.json`` (:data:`ANDROID_SCHEMA`; per artifact its runtime,
    sha256, size, companions, LiteRT signatures and the gates ``min_token_agreement`` and
    ``max_perplexity_ratio``; ``generation``: new tokens, BOS/EOS ids, context length, the chat affixes).
    Returns the asset folder. Raises ExportError (no decoder the app runs, a tokenizer it does not implement)."""
    from tokenizers import Tokenizer

    from edgelm.data import default_text
    from edgelm.generation import PROMPTS, unpad
    from edgelm.validate.tokenizer_parity import corpora

    manifest = bundle.manifest
    gen = (manifest.model_extra or {}).get("generation") or {}
    runnable = [a for a in manifest.artifacts if a.format in APP_DECODER_RUNTIMES]
    if not runnable:
        raise ExportError(
            "--bundle android: the demo app runs ExecuTorch (.pte) and LiteRT (.tflite) decoders and this export "
            f"has {', '.join(a.file for a in manifest.artifacts)}: add --format executorch or --format tflite"
        )
    out = android_assets(bundle.path)
    out.mkdir(parents=True, exist_ok=True)
    tok_file = bundle.file("tokenizer.json")
    tokenizer = byte_level_bpe_settings(tok_file)
    _link_or_copy(tok_file, out / "tokenizer.json")
    _link_or_copy(bundle.file(manifest.golden.file), out / manifest.golden.file)
    golden = bundle.golden
    hf = Tokenizer.from_file(str(tok_file))
    prompts = [hf.decode(unpad(r), skip_special_tokens=False) for r in golden["prompt_tokens"]]
    references = [hf.decode(unpad(r), skip_special_tokens=False) for r in golden["reference_tokens"]]
    (out / "prompts.json").write_text(
        json.dumps({"prompts": prompts, "messages": list(PROMPTS), "reference_texts": references}, indent=1) + "\n"
    )
    # SST-2 dev from the shared data, found beside WikiText-2 (the export's perplexity text, or the default)
    texts_at = [Path(gen["perplexity_text"]) if gen.get("perplexity_text") else None, default_text()]
    wikitext = next((p for p in texts_at if p is not None and p.is_file() and p.match("wikitext2/raw/*")), None)
    data_root = wikitext.parents[2] if wikitext is not None else None
    texts = corpora(data_root, prompts)
    texts.pop("wikitext2-test", None)  # 1.3 MB of text: the JDK test checks it, the APK carries the rest
    cases = [
        {"corpus": corpus, "text": t, "ids": hf.encode(t, add_special_tokens=False).ids}
        for corpus, rows in texts.items()
        for t in rows
    ]
    (out / "tokenizer_cases.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False) + "\n")
    artifacts = []
    for a in runnable:
        g = bundle.plan(a.file).gates
        artifacts.append(
            {
                **_app_artifact(bundle, a, out, APP_DECODER_RUNTIMES[a.format]),
                "max_seq_len": int(a.details.get("max_context_len") or manifest.tokenizer.max_length),
                "seq_buckets": None,
                "signatures": a.details.get("signatures"),
                "tolerance": {
                    "min_token_agreement": g.min_token_agreement,
                    "max_perplexity_ratio": g.max_perplexity_ratio,
                },
            }
        )
    ref_ppl = golden.get("reference_perplexity")
    doc = {
        **_app_manifest_head(manifest, ("kind", "output", "name", "architecture")),
        "labels": None,
        "tokenizer": tokenizer,
        "generation": {
            "new_tokens": int(gen.get("new_tokens") or golden["reference_tokens"].shape[1]),
            "bos_id": getattr(manifest.model, "bos_id", None),
            "eos_ids": list(getattr(manifest.model, "eos_ids", None) or []),
            "context_length": int(manifest.tokenizer.max_length),
            "temperature": 0.0,
            "chat": chat_affixes(prompts[0], PROMPTS[0]) if prompts else {"prefix": "", "suffix": ""},
            "reference_perplexity": None if ref_ppl is None else float(ref_ppl),
            "prompts_file": "prompts.json",
            "tokenizer_cases_file": "tokenizer_cases.json",
        },
        "golden": {
            "file": manifest.golden.file,
            "sha256": manifest.golden.sha256,
            "count": manifest.golden.count,
            "labeled": False,
            "source": manifest.golden.source,
        },
        "artifacts": artifacts,
        "not_in_app": [
            {"file": a.file, "reason": f"the demo app has no {a.format} decoder runtime (ONNX Runtime GenAI)"}
            for a in manifest.artifacts
            if a.format not in APP_DECODER_RUNTIMES
        ],
    }
    for name in ("prompts.json", "tokenizer_cases.json"):
        doc["generation"][name.split(".")[0] + "_sha256"] = exporters.sha256_file(out / name)
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out
