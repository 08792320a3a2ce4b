"""Inputs for the JVM core's tests (examples/android/jvm-test.sh), made with edgelm and Hugging Face tokenizers.

    python prepare_jvm_tests.py WORK [--data-dir ../../shared/data]

Writes
- WORK/tokens/: vocab.txt and settings.json of the packaged all-MiniLM-L6-v2 tokenizer (the "tokenizer" object
  an android bundle's manifest carries), and tokens.tsv: per line the text, the pair text (or empty), max_length
  and the token ids Hugging Face ``tokenizers`` gives (truncated and padded as edgelm does): every SST-2 dev
  sentence, MRPC dev pairs at two lengths (longest-first truncation), and hand-picked hard cases (accents,
  CJK, control characters, punctuation, special tokens in the text, over-long words, truncation);
- WORK/dist/pixel8/android/edgelm/: an android bundle of a tiny random classifier (ONNX and TFLite, int8),
  exported by ``edgelm export --bundle android`` with a labeled golden set.
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


def bundle(work: Path) -> Path:
    from typer.testing import CliRunner

    from edgelm.cli import app
    from edgelm.data import PROBE_SENTENCES
    from edgelm.testing import make_checkpoint

    model = make_checkpoint(work / "tiny", kind="classifier", seed=1)
    data = work / "probes.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(PROBE_SENTENCES[:24])))
    r = CliRunner().invoke(
        app,
        [
            "export",
            "--device",
            "pixel8",
            "--model",
            str(model),
            "--data",
            str(data),
            "--format",
            "onnx,tflite",
            "--seq-len",
            "32",
            "--out",
            str(work / "dist"),
            "--bundle",
            "android",
        ],
    )
    if r.exit_code not in (0, 1):
        sys.exit(f"prepare_jvm_tests: edgelm export failed:\n{r.output}")
    return work / "dist" / "pixel8" / "android" / "edgelm"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[3].parent / "shared" / "data")
    a = p.parse_args()
    n = tokens(a.work, a.data_dir)
    b = bundle(a.work)
    print(f"prepare_jvm_tests: {n} tokenizer cases, bundle {b}")


if __name__ == "__main__":
    main()
