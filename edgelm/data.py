"""Probe sentences, evaluation data files and tokenization.

Data files (``--data``): ``.tsv``, ``.csv`` or ``.jsonl`` with a header (TSV/CSV) or one JSON object per
line. The text column is found by name (``text``, ``sentence``, ``sentence1``/``question``/``premise`` with
an optional second column ``sentence2``/``sentence``/``hypothesis`` for pairs, ...) or given with
``text_column``; the optional label column is ``label`` (or ``label_column``). Labels may be class
indices or class names.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import DataError, ModelError

#: Text columns found by name, first match wins (``description``: AG News' CSV, beside its ``title``).
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise", "content", "review", "document", "description")
PAIR_COLUMNS = {"sentence1": "sentence2", "question": "sentence", "premise": "hypothesis"}
LABEL_COLUMNS = ("label", "labels", "class", "category")

#: Built-in probe sentences: 74 of varied length and domain (4 to 160 tokens; the longest are truncated
#: at the recipe's sequence length), used when no ``--data`` is given.
PROBE_SENTENCES: tuple[str, ...] = (
    "Hello world.",
    "Thanks!",
    "Where is the nearest train station?",
    "The battery drains too fast after the update.",
    "I loved every minute of this film.",
    "Worst customer service I have ever experienced.",
    "Set an alarm for six thirty tomorrow morning.",
    "Can you translate this paragraph into French?",
    "The quarterly revenue grew by twelve percent year over year.",
    "A quick brown fox jumps over the lazy dog.",
    "Please remind me to call my mother on Sunday.",
    "The soup was cold and the bread was stale.",
    "Our flight was delayed by three hours because of fog.",
    "Is it going to rain in Berlin this weekend?",
    "The new phone has a brighter screen and a faster chip.",
    "He finally finished the marathon in under four hours.",
    "What is the capital of Australia?",
    "This library makes exporting models painless.",
    "The meeting has been moved to Thursday afternoon.",
    "I am not sure whether the package arrived yesterday or today.",
    "Neural networks learn representations from data.",
    "Turn off the lights in the living room.",
    "The museum is closed on Mondays and public holidays.",
    "She said the plot was predictable, but the acting was superb.",
    "Quantization reduces model size by storing weights in fewer bits.",
    "My laptop overheats whenever I run a video call.",
    "The hotel room was spotless, quiet and had a lovely view of the harbour.",
    "Why does the app crash when I open the camera?",
    "The committee will publish its final report next spring.",
    "A gentle breeze carried the smell of fresh bread through the street.",
    "Order two large pizzas with extra cheese and no olives.",
    "The stock market fell sharply after the interest rate announcement.",
    "I can't believe how much better the sequel is than the original.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Do you know any good restaurants near the old town square?",
    "The referee's decision in the final minute changed the outcome of the match.",
    "Our team shipped the feature two weeks ahead of schedule.",
    "The instructions were confusing and half of the screws were missing.",
    "Heavy snowfall closed the mountain pass for the second day in a row.",
    "Edge devices have tight memory budgets, so every megabyte counts.",
    "The concert was loud, crowded, and absolutely worth it.",
    "Please summarize the main arguments of the article in three sentences.",
    "The doctor recommended more sleep, less coffee and a short walk every day.",
    "Researchers found that the new vaccine was effective in older adults.",
    "Not bad at all, though the ending dragged on a little.",
    "Can I return the shoes if I have already worn them outside once?",
    "The river flooded the lower fields after a week of continuous rain.",
    "I would rather stay home and read than go to another noisy party.",
    "The startup raised forty million dollars to build chips for on-device AI.",
    "This is, without any doubt, the most boring book I have read this year.",
    "How many tablespoons are there in a quarter cup of sugar?",
    "The garden looks wonderful now that the roses are in full bloom.",
    "Traffic on the ring road was backed up for miles because of an accident near the airport exit.",
    "Despite the hype, the product feels unfinished and the software is buggy in ways that are hard to ignore.",
    "The orchestra opened with a slow movement that built, bar by bar, into a thunderous finale.",
    "If the train leaves at nine and the trip takes two and a half hours, we will arrive before noon.",
    "Customer reviews praise the long battery life, the sturdy case and the clear, natural sound of the speakers.",
    "The city council approved a plan to plant ten thousand trees and add forty kilometres of protected bike lanes.",
    "A good benchmark compares tools side by side on the same hardware, the same inputs and the same number of threads.",
    "After years of delays, the bridge finally opened, cutting the commute between the two towns from an hour to fifteen minutes.",
    "The film's first half is gripping, but the second half loses its way in subplots that never pay off, and the ending is rushed.",
    "I asked for a refund three times by email and twice by phone, and each time I was promised a reply within forty-eight hours.",
    "Scientists observed the comet for several weeks, measuring how its tail changed as it swung closer to the sun and then away again.",
    "Knowledge distillation trains a small student model to match the softened output distribution of a larger teacher model on the same inputs.",
    "The recipe calls for flour, butter, sugar, two eggs, a pinch of salt and a teaspoon of vanilla, mixed slowly and baked for twenty-five minutes.",
    "Our hiking group set off before dawn, crossed two ridges and a glacier-fed stream, and reached the hut just as the storm rolled in over the peaks.",
    "The report argues that rural broadband, not new highways, is the investment most likely to keep young families from leaving small towns in the region.",
    "When the power went out during the exam, the students waited in the dark for almost an hour, and then the proctor told everyone to come back the next morning.",
    "The museum's new wing displays hundreds of objects from the ancient trade routes, including coins, textiles, ceramics, glassware and a remarkably preserved wooden boat that was found in the silt of a dried-up harbour two decades ago.",
    "In a long and detailed review, the critic praised the novel's ambition, its vivid characters and its sharp dialogue, but complained that the middle section, which follows the family across three continents and five decades, is so crowded with minor figures that the main story almost disappears from view before the final chapters bring it back.",
    "The engineering team profiled the application on five different phones, found that most of the time was spent in a single matrix multiplication inside the attention layer, rewrote that kernel to use the processor's dot-product instructions, and cut the median latency from forty milliseconds to just under twelve while keeping the outputs identical to three decimal places.",
    "Terms and conditions: the subscription renews automatically every month unless cancelled at least twenty-four hours before the end of the current period; refunds are not provided for partial months; prices may change with thirty days' notice; and by continuing to use the service you agree to the collection of anonymous usage statistics as described in the privacy policy, which may itself be updated from time to time without further notice to you.",
    "The release notes list every change in this version: the exporter now writes one file per target format "
    "instead of a folder of fragments; the validation step compares each artifact with the reference model on "
    "the same inputs and reports cosine similarity, top-1 agreement and the largest absolute error; the command "
    "line prints a table with sizes, latencies and gate results; profiles for six new phones and boards were "
    "added, including two low-memory devices; the tokenizer handles accented characters, punctuation and very "
    "long inputs consistently with the reference implementation; temporary files are written beside the output "
    "and renamed at the end so that an interrupted run leaves nothing behind; and the documentation explains, "
    "step by step, how to reproduce each benchmark on your own hardware with the same settings we used.",
    "It was late in the autumn when the travellers reached the valley, tired from the long road over the pass, "
    "and the village they had hoped to find was no more than a handful of stone houses around a square where a "
    "fountain still ran; an old woman told them that the inn had closed years ago, that the last bus left at "
    "dawn, and that if they wanted a bed they should ask the baker, whose son had gone to the city and left an "
    "empty room above the shop; they thanked her, bought bread and cheese, and sat by the fountain while the "
    "light faded from the peaks, talking about the places they had seen, the people they had met on the way, "
    "and whether they would ever come back to this quiet, forgotten corner of the mountains again.",
)


@dataclass
class TextDataset:
    """Texts (and optional pairs and labels) for validation.

    Attributes:
        texts: first segments, N strings.
        pairs: second segments (sentence-pair tasks) or None.
        labels: N labels as read (ints or strings) or None.
        source: the file, or ``"built-in probe sentences"``.
    """

    texts: list[str]
    pairs: list[str] | None = None
    labels: list | None = None
    source: str = "built-in probe sentences"

    def __len__(self) -> int:
        return len(self.texts)


def probe_dataset() -> TextDataset:
    """The built-in probe sentences (no labels)."""
    return TextDataset(texts=list(PROBE_SENTENCES))


def check_limit(limit: int | None, option: str = "--limit") -> None:
    """A row limit must be at least 1 (None: no limit). Raises DataError."""
    if limit is not None and limit < 1:
        raise DataError(f"{option} {limit}: give a number of rows of at least 1 (or leave it out for all rows)")


def ignored_labels_warning(data: TextDataset, kind: str) -> str:
    """The warning for labeled data given to a model that has no use for labels (an embedding model)."""
    return (
        f"{data.source} has labels, but this {kind} model has no classes to check them against: the labels are "
        "ignored and the texts are used as the golden set (export a fine-tuned classifier to measure accuracy)"
    )


#: csv's default field limit is 131,072 characters; a long document is valid data (it is truncated to the
#: sequence length when tokenized), so the limit is raised to this many characters.
CSV_FIELD_LIMIT = 2**31 - 1


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"--data must be a file, not a directory: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: pass a .tsv, .csv or .jsonl file") from None
    if suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not a JSON object per line ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: each line must be a JSON object with a text field")
            rows.append(obj)
        return rows
    if suffix in (".tsv", ".csv", ".txt"):
        delim = "," if suffix == ".csv" else "\t"
        # GLUE TSVs contain unbalanced quotes (MRPC, SST-2): no quote processing for TSV.
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        reader = csv.DictReader(raw.splitlines(), delimiter=delim, quoting=quoting)
        try:
            if not reader.fieldnames:
                raise DataError(f"{path} is empty: it needs a header row and data rows")
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
            return list(reader)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not a valid {suffix[1:].upper()} row ({exc})") from None
    raise DataError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv or .jsonl")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str | None:
    lower = {c.lower(): c for c in columns}
    if wanted:
        if wanted not in columns and wanted.lower() not in lower:
            raise DataError(f"{path} has no {what} column {wanted!r}; its columns are: {', '.join(columns)}")
        return lower.get(wanted.lower(), wanted)
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def load_dataset(
    path: str | Path,
    text_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
) -> TextDataset:
    """Read a labeled or unlabeled text file (see module docstring).

    Args:
        limit: keep the first ``limit`` rows (None: all).
    Raises:
        DataError: missing/unreadable file, unknown format, no text column, empty file, empty texts.
    """
    check_limit(limit)
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has no data rows")
    columns = list(rows[0].keys())
    lower = {c.lower() for c in columns}
    pair_first = tuple(a for a, b in PAIR_COLUMNS.items() if a in lower and b in lower)
    tcol = _pick(columns, text_column, pair_first + TEXT_COLUMNS, "text", path)
    if tcol is None:
        raise DataError(
            f"{path} has no text column (looked for {', '.join(TEXT_COLUMNS)}; its columns are: "
            f"{', '.join(columns)}): rename the column or pass --text-column"
        )
    pair_name = PAIR_COLUMNS.get(tcol.lower())
    pcol = _pick(columns, None, (pair_name,), "pair", path) if pair_name else None
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", path)
    if limit is not None:
        rows = rows[:limit]
    texts, pairs, labels = [], [], []
    for i, row in enumerate(rows):
        text = row.get(tcol)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i + 1} has an empty or missing {tcol!r} value")
        texts.append(text.strip())
        if pcol:
            pairs.append(str(row.get(pcol) or "").strip())
        if lcol:
            labels.append(row.get(lcol))
    return TextDataset(texts=texts, pairs=pairs or None, labels=labels or None, source=str(path))


def label_indices(labels: list, names: list[str] | None) -> np.ndarray:
    """Map labels (indices, digit strings, or class names from ``names``) to int64 [N].
    Raises DataError for a label that is neither a valid index nor a known name."""
    out = []
    lookup = {n.lower(): i for i, n in enumerate(names or [])}
    n_classes = len(names) if names else None
    for lab in labels:
        s = str(lab).strip()
        if s.lstrip("-").isdigit():
            idx = int(s)
        elif s.lower() in lookup:
            idx = lookup[s.lower()]
        else:
            raise DataError(
                f"label {lab!r} is not a class index or one of the model's labels ({', '.join(names or [])})"
            )
        if n_classes is not None and not 0 <= idx < n_classes:
            raise DataError(f"label {idx} is out of range for a model with {n_classes} classes")
        out.append(idx)
    return np.asarray(out, dtype=np.int64)


def load_tokenizer(directory: Path, seq_len: int):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (or ``vocab.txt`` + ``tokenizer_config.json``'s
    ``do_lower_case``), set to truncate at ``seq_len`` tokens and pad to ``seq_len``."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    directory = Path(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{cfg_path} is corrupt (not JSON: {exc}); re-save the tokenizer") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{cfg_path} is corrupt (not a JSON object); re-save the tokenizer")
    tok_path = directory / "tokenizer.json"
    try:
        if tok_path.is_file():
            tok = Tokenizer.from_file(str(tok_path))
        else:
            tok_path = directory / "vocab.txt"
            tok = BertWordPieceTokenizer(str(tok_path), lowercase=bool(cfg.get("do_lower_case", True)))
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{tok_path} is not a valid tokenizer ({first}): re-save it with tokenizer.save_pretrained(DIR)"
        ) from None
    pad_token = cfg.get("pad_token") if isinstance(cfg.get("pad_token"), str) else "[PAD]"
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        pad_token, pad_id = "[PAD]", tok.token_to_id("[PAD]") or 0
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=pad_id, pad_token=pad_token)
    return tok


def encode(tokenizer, data: TextDataset) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``data`` -> (input_ids int64 [N, seq_len], attention_mask int64 [N, seq_len])."""
    if data.pairs:
        encs = tokenizer.encode_batch(list(zip(data.texts, data.pairs, strict=False)))
    else:
        encs = tokenizer.encode_batch(data.texts)
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


#: Where the default perplexity text (of text-generation exports) is looked for (``$EDGELM_DATA`` first).
WIKITEXT = Path("wikitext2") / "raw" / "wiki.test.raw"


def default_text() -> Path | None:
    """WikiText-2's test text from ``$EDGELM_DATA`` or ``../shared/data`` (None when neither has it)."""
    for root in (os.environ.get("EDGELM_DATA"), Path.cwd().parent / "shared" / "data"):
        if root and (Path(root) / WIKITEXT).is_file():
            return Path(root) / WIKITEXT
    return None
