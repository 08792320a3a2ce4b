"""Inputs for the JVM core's tests (examples/android/jvm-test.sh), made with edgelm and Hugging Face tokenizers.

    python prepare_jvm_tests.py WORK [--data-dir ../../shared/data]

Writes
- WORK/tokens/: vocab.txt and settings.json of the packaged all-MiniLM-L6-v2 tokenizer (the "tokenizer" object
  an android bundle's manifest carries), and tokens.tsv: per line the text, the pair text (or empty), max_length
  and the token ids Hugging Face ``tokenizers`` gives (truncated and padded as edgelm does): every SST-2 dev
  sentence, MRPC dev pairs at two lengths (longest-first truncation), and hand-picked hard cases (accents,
  CJK, control characters, punctuation, special tokens in the text, over-long words, truncation);
- WORK/dist/pixel8/android/edgelm/: an android bundle of a tiny random classifier (ONNX and TFLite, int8),
  exported by ``edgelm export --bundle android`` with a labeled golden set;
- WORK/bpe/<name>/: tokenizer.json and cases.jsonl (per line {"corpus", "text", "ids"}: Hugging Face's ids,
  no special tokens added) for each byte-level BPE tokenizer: one trained here on SST-2 train sentences
  (8,000 tokens, Digits then ByteLevel pre-tokenizer, ChatML specials) and any ``--bpe-tokenizer`` file
  (e.g. SmolLM2's); the texts: WikiText-2 test lines, SST-2 dev sentences, the hard cases, the golden prompts;
- WORK/gen/dist/pixel8/android/edgelm/: the android bundle of a tiny random causal LM (``.pte``, 8da4w);
- WORK/ee/pixel8/android/edgelm/: the android bundle of a tiny early-exit classifier (ONNX and TFLite int8
  cascades) and WORK/ee/replay.npz, its segments' outputs on the golden rows (:func:`ee_bundle`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HARD_CASES = [
    "",
    "   ",
    "Hello, World!",
    "Café déjà vu, naïve façade — Ångström",
    "e\u0301 vs \u00e9",
    "我爱北京天安门 ok",
    "カタカナ and ひらがな",
    "한국어 문장",
    "tab\there\nnew\rline\u0000nul\ufffdreplacement",
    "zero\u200bwidth\u200djoiner",
    "a\u00a0b\u2003c\u3000d",
    "ΟΔΟΣ ΣΑΣ όλοι",
    "İstanbul DİYARBAKIR",
    "I ❤️ 🍕 and 😀!",
    "a" * 150,
    "x" * 99 + " y",
    "hello [MASK] world [SEP] [CLS]",
    "[mask] lower-case specials",
    "don’t “smart” quotes…",
    "1,234.56 $5 50% a/b c\\d",
    "(parens) [brackets] {braces} <angles> ^caret~ `tick` |pipe|",
    "ＡＢＣ ｆｕｌｌ ｗｉｄｔｈ",
    "Zürich Straße ÆØÅ œuvre",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "the quick brown fox jumps over the lazy dog " * 40,
]


def escape(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ch in "\u0085\u2028\u2029":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def tokens(work: Path, data_dir: Path) -> int:
    from edgelm.adapt.tasks import load_task
    from edgelm.appbundle import wordpiece_settings
    from edgelm.data import load_dataset, load_tokenizer
    from edgelm.models import default_model_dir

    src = default_model_dir()
    out = work / "tokens"
    out.mkdir(parents=True)
    shutil.copy2(src / "vocab.txt", out / "vocab.txt")
    (out / "settings.json").write_text(json.dumps(wordpiece_settings(src, 128), indent=2))
    cases: list[tuple[str, str | None, int]] = [(t, None, 128) for t in HARD_CASES]
    cases += [(t, None, 8) for t in HARD_CASES[:6]] + [(HARD_CASES[-1], "and a pair " * 30, 16)]
    sst2 = data_dir / "sst2" / "dev.tsv"
    if sst2.is_file():
        cases += [(t, None, 128) for t in load_dataset(str(sst2)).texts]
    else:
        print(f"prepare_jvm_tests: {sst2} not found: the SST-2 parity check is left out", file=sys.stderr)
    if (data_dir / "mrpc" / "dev.tsv").is_file():
        mrpc = load_task(data_dir, "mrpc", limit=150)
        for n in (24, 128):
            cases += [(a, b, n) for a, b in zip(mrpc.texts, mrpc.pairs, strict=False)]
    lines = []
    for max_len in sorted({c[2] for c in cases}):
        tok = load_tokenizer(src, max_len)
        for text, pair, n in (c for c in cases if c[2] == max_len):
            enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
            lines.append("\t".join([escape(text), escape(pair or ""), str(n), ",".join(map(str, enc.ids))]))
    (out / "tokens.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def export(*args: str, what: str) -> None:
    """`edgelm export --device pixel8 ARGS`; exits when the export fails (a missed gate is fine: exit 1)."""
    from typer.testing import CliRunner

    from edgelm.cli import app

    r = CliRunner().invoke(app, ["export", "--device", "pixel8", *args])
    if r.exit_code not in (0, 1):
        sys.exit(f"prepare_jvm_tests: edgelm export of {what} failed:\n{r.output}")


def bundle(work: Path) -> Path:

    from edgelm.data import PROBE_SENTENCES
    from edgelm.testing import make_checkpoint

    model = make_checkpoint(work / "tiny", kind="classifier", seed=1)
    data = work / "probes.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(PROBE_SENTENCES[:24])))
    export(
        "--model", str(model), "--data", str(data), "--format", "onnx,tflite", "--seq-len", "32",
        "--out", str(work / "dist"), "--bundle", "android", what="the classifier",
    )  # fmt: skip
    return work / "dist" / "pixel8" / "android" / "edgelm"


def ee_bundle(work: Path) -> Path:
    """The android bundle of an early-exit checkpoint (a tiny classifier fine-tuned on the probe sentences, exits
    after layers 1 and 2) with ONNX and TFLite int8 cascades beside the whole models, and ``replay.npz`` beside
    it: what each cascade's segments return on each golden row and on the timing row (row N), run here in their
    real runtimes without exiting (``{i}_s{k}_r{r}_hidden`` float32 [seq * hidden], ``{i}_s{k}_r{r}_logits`` float32 [labels]; ``i``
    the cascade's index in ``cascades``), the exit layer each row takes at the bundle's threshold
    (``{i}_exit_layers``) and at a few other thresholds (``{i}_thresholds``, ``{i}_sweep_exit_layers`` [T, N])."""
    import numpy as np

    import exporters
    from edgelm.compress.early_exit import run_early_exit
    from edgelm.compress.jobs import run_finetune
    from edgelm.compress.train import TrainConfig
    from edgelm.data import PROBE_SENTENCES
    from edgelm.testing import make_checkpoint
    from exporters.base import trim_padding
    from exporters.cascade import confidence, exit_choice

    data = work / "memo.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(PROBE_SENTENCES)))
    cfg = TrainConfig(epochs=8, lr=3e-3, batch_size=8, seq_len=32)
    run_finetune(make_checkpoint(work / "ee-base", heads=2, seed=3), data, work / "ee-ft", cfg=cfg)
    run_early_exit(work / "ee-ft", data, work / "ee-model", exit_layers=[1], freeze_backbone=False, cfg=cfg)
    export(
        "--model", str(work / "ee-model"), "--data", str(data), "--limit", "32", "--format", "onnx,tflite",
        "--seq-len", "32", "--max-accuracy-drop", "5", "--out", str(work / "ee"), "--bundle", "android",
        what="the early-exit classifier",
    )  # fmt: skip
    app = work / "ee" / "pixel8" / "android" / "edgelm"
    manifest = json.loads((app / "manifest.json").read_text())
    golden = np.load(app / manifest["golden"]["file"])
    replay, names = {}, []
    for i, a in enumerate(x for x in manifest["artifacts"] if x.get("cascade")):
        names.append(a["file"])
        session = exporters.load(app / a["file"], threads=1)
        c = session.cascade
        per_exit = []
        # the golden rows, then the timing row (row N: the on-device check warms up and times on it)
        ids = np.concatenate([golden["input_ids"], golden["latency_input_ids"]])
        masks = np.concatenate([golden["attention_mask"], golden["latency_attention_mask"]])
        for r in range(len(ids)):
            feeds = trim_padding({"input_ids": ids[r : r + 1], "attention_mask": masks[r : r + 1]})
            mask, logits_r = feeds["attention_mask"], []
            for k, seg in enumerate(session.sessions):
                out = seg.run(feeds)
                replay[f"{i}_s{k}_r{r}_logits"] = out["logits"][0].astype(np.float32)
                logits_r.append(out["logits"][0])
                if "hidden_out" in out:
                    replay[f"{i}_s{k}_r{r}_hidden"] = out["hidden_out"][0].astype(np.float32).ravel()
                    feeds = {"hidden_states": out["hidden_out"], "attention_mask": mask}
            per_exit.append(logits_r)
        logits = [np.stack([row[k] for row in per_exit[:-1]]) for k in range(len(c.segments))]
        layers = np.asarray(c.exit_layers, np.int64)
        replay[f"{i}_exit_layers"] = session.run(
            {"input_ids": golden["input_ids"], "attention_mask": golden["attention_mask"]}
        )["exit_layer"].astype(np.int64)
        first = confidence(logits[0], c.confidence)
        # float32 (what the JVM's npz reader keeps), compared in float64 on both sides
        thresholds = np.quantile(first, [0.1, 0.5, 0.9]).astype(np.float32)
        replay[f"{i}_thresholds"] = thresholds
        thresholds = thresholds.astype(np.float64)
        replay[f"{i}_sweep_exit_layers"] = np.stack([layers[exit_choice(logits, c.confidence, t)] for t in thresholds])
    np.savez(work / "ee" / "replay.npz", cascades=np.asarray(names), **replay)
    return app


def bpe(work: Path, data_dir: Path, extra: list[Path]) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.generation import PROMPTS
    from edgelm.validate.tokenizer_parity import corpora

    texts = corpora(data_dir if data_dir.is_dir() else None)
    texts["golden prompts"] = [CHATML_PROMPT.format(p) for p in PROMPTS]
    sources: dict[str, Path] = {}
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trained.decoder = decoders.ByteLevel()
    sst2 = data_dir / "sst2" / "train.tsv"
    corpus = [r.split("\t")[0] for r in sst2.read_text(encoding="utf-8").split("\n")[1:]] if sst2.is_file() else []
    trained.train_from_iterator(
        corpus or [t for rows in texts.values() for t in rows],
        trainers.BpeTrainer(
            vocab_size=8000,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    out = work / "bpe"
    (out / "trained-sst2").mkdir(parents=True)
    trained.save(str(out / "trained-sst2" / "tokenizer.json"))
    sources["trained-sst2"] = out / "trained-sst2" / "tokenizer.json"
    for f in extra:
        name = f"{f.parent.name or 'extra'}-tokenizer"
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / name / "tokenizer.json")
        sources[name] = out / name / "tokenizer.json"
    n = 0
    for path in sources.values():
        tok = Tokenizer.from_file(str(path))
        with (path.parent / "cases.jsonl").open("w", encoding="utf-8") as fh:
            for corpus_name, rows in texts.items():
                for t in rows:
                    ids = tok.encode(t, add_special_tokens=False).ids
                    fh.write(json.dumps({"corpus": corpus_name, "text": t, "ids": ids}, ensure_ascii=False) + "\n")
                    n += 1
    return n


#: The golden prompts as a ChatML template renders them (the tiny models' template, SmolLM2's without its
#: system turn): special tokens inside the text.
CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def gen_bundle(work: Path, data_dir: Path) -> Path:

    from edgelm.testing import make_causal_lm

    model = make_causal_lm(work / "tiny-llama")
    wiki = data_dir / "wikitext2" / "raw" / "wiki.test.raw"
    export(
        "--model", str(model), "--format", "executorch", "--context-length", "128",
        *(["--data", str(wiki)] if wiki.is_file() else []), "--out", str(work / "gen"), "--bundle", "android",
        what="the causal LM",
    )  # fmt: skip
    return work / "gen" / "pixel8" / "android" / "edgelm"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[3].parent / "shared" / "data")
    p.add_argument(
        "--bpe-tokenizer",
        type=Path,
        action="append",
        default=[],
        help="another byte-level BPE tokenizer.json to compare (its folder names it), e.g. a SmolLM2 bundle's",
    )
    a = p.parse_args()
    n = tokens(a.work, a.data_dir)
    b = bundle(a.work)
    m = bpe(a.work, a.data_dir, a.bpe_tokenizer)
    g = gen_bundle(a.work, a.data_dir)
    e = ee_bundle(a.work)
    print(f"prepare_jvm_tests: {n} WordPiece cases, {m} byte-level BPE cases, bundles {b}, {g} and {e}")


if __name__ == "__main__":
    main()
