"""The runtime's tokenizer, checked against Hugging Face ``tokenizers``.

On a phone or a board the tokenizer is not Hugging Face's: ExecuTorch's LLM runner (and the Android
``LlmModule``) use the C++ ``pytorch-tokenizers`` (its ``HFTokenizer`` reads ``tokenizer.json``; the same code
is on PyPI as ``pytorch_tokenizers.CppHFTokenizer``), and onnxruntime-genai has its own (``og.Tokenizer``).
The golden set's token ids come from ``tokenizers``; if a runtime's tokenizer encodes a text differently, the
model sees different ids on the device than in the check. :func:`check_tokenizers` encodes and decodes the
same texts with each and counts the differences:

- ``wikitext2-test``: every non-empty line of WikiText-2's test text (``wikitext2/raw/wiki.test.raw``);
- ``sst2-dev``: every SST-2 dev sentence;
- ``hard cases``: :data:`HARD_CASES` (emoji and ZWJ sequences, CJK, right-to-left and combining scripts,
  control characters, long runs of spaces and tabs, the chat template's special tokens);
- ``golden prompts``: the bundle's chat-templated golden prompts, as the artifacts were checked with them.

Encode: ids of the text with no special tokens added (``tokenizers``' ``add_special_tokens=False``; the C++
tokenizer with ``bos=0, eos=0``). Decode: the reference's ids decoded back (special tokens kept, except for
onnxruntime-genai, whose ``decode`` always drops them: compared with ``skip_special_tokens=True``).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Texts where byte-level BPE implementations tend to differ.
HARD_CASES: tuple[str, ...] = (
    "😀 😃 😄 👍🏽 🇫🇷",
    "👩‍👩‍👧‍👦 family, 🧑🏾‍💻 coder",
    "東京は日本の首都です。北京是中国的首都。",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "e\u0301 vs é, n\u0303 vs ñ",
    "tab\tand\ttabs\t\t\tend",
    "a" + " " * 64 + "b",
    "    four leading spaces",
    "trailing spaces    ",
    "line\r\nbreaks\n\n\nand\rreturns",
    "bell\x07 escape\x1b[0m backspace\x08 form\x0cfeed",
    "nul\x00inside",
    "non\u00a0breaking\u2009thin\u3000ideographic space",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> between <|im_end|> tokens",
    "https://example.com/path?q=1&x=%20 user@example.com",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "1234567890 3.14159 -42 1e-9 ½ ⅓ ²",
    "supercalifragilisticexpialidocious" * 4,
    "ÀÉÎÕÜ àéîõü ß Ø ø Æ æ Œ œ",
    "Ελληνικά, Русский, Українська",
    "",
)


@dataclass
class RuntimeTokenizer:
    """One runtime's tokenizer: ``encode(text) -> ids`` (no special tokens added) and ``decode(ids) -> text``."""

    name: str
    used_by: str
    version: str
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    skips_special_tokens: bool = False


@dataclass
class ParityResult:
    """How one runtime's tokenizer compares with ``tokenizers`` over every corpus.

    Attributes:
        texts: texts compared per corpus.
        encode_mismatches / decode_mismatches: texts whose ids (decoded text) differ, per corpus.
        examples: the first few differences: corpus, text (repr, cut to 80 characters), the first differing
            position, and both sides there.
        error: why the tokenizer could not run at all (then nothing was compared).
    """

    name: str
    used_by: str
    version: str
    texts: dict[str, int] = field(default_factory=dict)
    encode_mismatches: dict[str, int] = field(default_factory=dict)
    decode_mismatches: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def identical(self) -> bool:
        return (
            self.error is None and not any(self.encode_mismatches.values()) and not any(self.decode_mismatches.values())
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "used_by": self.used_by,
            "version": self.version,
            "texts": self.texts,
            "encode_mismatches": self.encode_mismatches,
            "decode_mismatches": self.decode_mismatches,
            "identical": self.identical,
            "examples": self.examples,
            "error": self.error,
        }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def runtime_tokenizers(directory: Path) -> tuple[list[RuntimeTokenizer], dict[str, str]]:
    """The runtimes' tokenizers for the ``tokenizer.json`` in ``directory`` (a generative bundle): the C++
    ``pytorch-tokenizers`` (ExecuTorch) and onnxruntime-genai's. Returns ``(tokenizers that loaded, {name: why
    not} for those that did not)``: a runtime that is not installed is a reason, not an error."""
    from exporters.decoder import quiet_stderr

    directory = Path(directory)
    path = directory / "tokenizer.json"
    found, missing = [], {}
    try:
        with quiet_stderr():  # its regex fallback logs a line on import
            import pytorch_tokenizers

            cpp = pytorch_tokenizers.CppHFTokenizer()
            cpp.load(str(path))
        found.append(
            RuntimeTokenizer(
                "pytorch-tokenizers",
                "ExecuTorch LLM runner, Android LlmModule",
                _version("pytorch_tokenizers"),
                lambda text: list(cpp.encode(text, 0, 0)),
                lambda ids: cpp.decode_batch(list(ids)),
            )
        )
    except ImportError:
        missing["pytorch-tokenizers"] = "pytorch_tokenizers is not installed (pip install pytorch-tokenizers)"
    except Exception as exc:  # the C++ loader's own error
        missing["pytorch-tokenizers"] = f"could not load {path}: {exc}"
    try:
        import onnxruntime_genai as og

        if not (directory / "genai_config.json").is_file():  # og reads the tokenizer through its model config
            missing["onnxruntime-genai"] = "the bundle has no ONNX decoder (genai_config.json)"
            return found, missing
        gen = og.Tokenizer(str(directory))
        found.append(
            RuntimeTokenizer(
                "onnxruntime-genai",
                "onnxruntime-genai generator",
                _version("onnxruntime-genai"),
                lambda text: [int(i) for i in gen.encode(text)],
                lambda ids: gen.decode(ids),
                skips_special_tokens=True,
            )
        )
    except ImportError:
        missing["onnxruntime-genai"] = "onnxruntime_genai is not installed (pip install onnxruntime-genai)"
    except Exception as exc:
        missing["onnxruntime-genai"] = f"could not load {directory}: {exc}"
    return found, missing


def corpora(data_dir: Path | None, golden_prompts: list[str] | None = None) -> dict[str, list[str]]:
    """The texts to compare: WikiText-2 test lines and SST-2 dev sentences under ``data_dir`` (each left out
    when its file is missing), :data:`HARD_CASES`, and ``golden_prompts``."""
    out: dict[str, list[str]] = {}
    if data_dir is not None:
        wiki = Path(data_dir) / "wikitext2" / "raw" / "wiki.test.raw"
        if wiki.is_file():
            out["wikitext2-test"] = [ln for ln in wiki.read_text(encoding="utf-8").split("\n") if ln.strip()]
        sst2 = Path(data_dir) / "sst2" / "dev.tsv"
        if sst2.is_file():
            rows = sst2.read_text(encoding="utf-8").split("\n")[1:]
            out["sst2-dev"] = [r.split("\t")[0] for r in rows if r.strip()]
    out["hard cases"] = list(HARD_CASES)
    if golden_prompts:
        out["golden prompts"] = list(golden_prompts)
    return out


def _first_difference(a: list, b: list) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(reference, runtime: RuntimeTokenizer, texts: dict[str, list[str]], max_examples: int = 8) -> ParityResult:
    """Encode and decode every text of ``texts`` with ``reference`` (a ``tokenizers.Tokenizer``) and
    ``runtime``; count the differences per corpus (see :class:`ParityResult`)."""
    res = ParityResult(runtime.name, runtime.used_by, runtime.version)
    for corpus, items in texts.items():
        res.texts[corpus] = len(items)
        enc_bad = dec_bad = 0
        for text in items:
            ref_ids = reference.encode(text, add_special_tokens=False).ids
            got_ids = runtime.encode(text)
            if got_ids != ref_ids:
                enc_bad += 1
                if len(res.examples) < max_examples:
                    i = _first_difference(ref_ids, got_ids)
                    res.examples.append(
                        {
                            "corpus": corpus,
                            "what": "encode",
                            "text": repr(text)[:80],
                            "position": i,
                            "reference": ref_ids[i : i + 4],
                            "runtime": got_ids[i : i + 4],
                            "lengths": [len(ref_ids), len(got_ids)],
                        }
                    )
            ref_text = reference.decode(ref_ids, skip_special_tokens=runtime.skips_special_tokens)
            try:
                got_text = runtime.decode(ref_ids)
            except UnicodeDecodeError as exc:
                got_text = f"<{exc.__class__.__name__}>"
            if got_text != ref_text:
                dec_bad += 1
                if len(res.examples) < max_examples:
                    i = _first_difference(list(ref_text), list(got_text))
                    res.examples.append(
                        {
                            "corpus": corpus,
                            "what": "decode",
                            "text": repr(text)[:80],
                            "position": i,
                            "reference": repr(ref_text[i : i + 12]),
                            "runtime": repr(got_text[i : i + 12]),
                        }
                    )
        res.encode_mismatches[corpus] = enc_bad
        res.decode_mismatches[corpus] = dec_bad
    return res


def check_tokenizers(directory: Path, data_dir: Path | None, golden_prompts: list[str] | None = None) -> dict:
    """Compare each runtime's tokenizer (:func:`runtime_tokenizers`) with ``tokenizers`` on
    :func:`corpora`. Returns the JSON-ready record a bundle keeps as ``tokenizer_check.json``:
    ``reference`` (tokenizers' version), ``texts`` per corpus, ``runtimes`` (one :meth:`ParityResult.to_dict`
    each) and ``not_checked`` ({runtime: why}).

    Raises:
        FileNotFoundError: ``directory`` has no ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    reference = Tokenizer.from_file(str(path))
    texts = corpora(data_dir, golden_prompts)
    found, missing = runtime_tokenizers(Path(directory))
    return {
        "reference": f"tokenizers {_version('tokenizers')} (Hugging Face)",
        "texts": {k: len(v) for k, v in texts.items()},
        "runtimes": [compare(reference, rt, texts).to_dict() for rt in found],
        "not_checked": missing,
    }


def summary_lines(record: dict) -> list[str]:
    """One line per runtime for the terminal and the report: ``pytorch-tokenizers 1.5.0 (ExecuTorch ...):
    identical on 7,093 texts`` or the mismatch counts per corpus."""
    total = sum(record["texts"].values())
    lines = []
    for r in record["runtimes"]:
        head = f"{r['name']} {r['version']} ({r['used_by']})"
        if r["identical"]:
            lines.append(f"{head}: encode and decode identical to {record['reference']} on {total:,} texts")
            continue
        parts = [
            f"{corpus}: {r['encode_mismatches'][corpus]} encode, {r['decode_mismatches'][corpus]} decode"
            for corpus in r["texts"]
            if r["encode_mismatches"][corpus] or r["decode_mismatches"][corpus]
        ]
        lines.append(f"{head}: differs from {record['reference']} on " + "; ".join(parts) + f" (of {total:,} texts)")
    lines += [f"{name}: not checked, {why}" for name, why in record["not_checked"].items()]
    return lines


def write_check(directory: Path, record: dict) -> Path:
    """Write ``record`` as ``tokenizer_check.json`` in ``directory``; returns its path."""
    out = Path(directory) / "tokenizer_check.json"
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return out
