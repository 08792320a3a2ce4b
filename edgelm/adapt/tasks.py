"""The labeled tasks of the shared data folder (``../shared/data``) in their published layouts, read as
:class:`~edgelm.data.TextDataset` for meta-training the hypernetwork and for the adaptation benchmark.

Each reader takes the data folder and returns texts (and second segments for pair tasks) with their labels
as class-name strings. Nothing is copied: the files are read where they are.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgelm.data import TextDataset
from edgelm.errors import DataError

#: The task the hypernetwork is evaluated on, held out of meta-training by default.
HELD_OUT = "sst2"


def _tsv(path: Path, header: bool = True, encoding: str = "utf-8") -> list[list[str]]:
    with open(path, encoding=encoding, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _cola(root: Path) -> TextDataset:
    rows = _tsv(root / "cola" / "raw" / "in_domain_train.tsv", header=False)
    return TextDataset([r[3] for r in rows], None, [("unacceptable", "acceptable")[int(r[1])] for r in rows])


def _mrpc(root: Path) -> TextDataset:
    rows = [r for r in _tsv(root / "mrpc" / "train.tsv", encoding="utf-8-sig") if len(r) == 5]
    return TextDataset(
        [r[3] for r in rows], [r[4] for r in rows], [("not_paraphrase", "paraphrase")[int(r[0])] for r in rows]
    )


def _rte(root: Path) -> TextDataset:
    rows = [r for r in _tsv(root / "rte" / "glue_format" / "train.tsv") if len(r) == 4]
    return TextDataset([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def _qnli(root: Path) -> TextDataset:  # only QNLI's dev split is in the shared folder
    rows = [r for r in _tsv(root / "qnli" / "dev.tsv") if len(r) == 4]
    return TextDataset([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def _trec(root: Path) -> TextDataset:
    texts, labels = [], []
    for line in (root / "trec" / "train_5500.label").read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, _, text = line.partition(" ")
            texts.append(text.strip())
            labels.append(label.split(":")[0])  # the 6 coarse classes
    return TextDataset(texts, None, labels)


def _agnews(root: Path) -> TextDataset:
    rows = [r for r in _tsv(root / "agnews" / "train_subset_10k_alps.tsv", header=False) if len(r) == 2]
    return TextDataset([r[0] for r in rows], None, [r[1] for r in rows])


def _sms(root: Path) -> TextDataset:
    rows = [r for r in _tsv(root / "sms_spam" / "SMSSpamCollection", header=False, encoding="utf-8") if len(r) == 2]
    return TextDataset([r[1] for r in rows], None, [r[0] for r in rows])


def _cb(root: Path) -> TextDataset:
    rows = [json.loads(x) for x in (root / "cb" / "train.jsonl").read_text().splitlines() if x.strip()]
    return TextDataset([r["premise"] for r in rows], [r["hypothesis"] for r in rows], [r["label"] for r in rows])


def _sst2(root: Path) -> TextDataset:
    rows = [r for r in _tsv(root / "sst2" / "train.tsv") if len(r) == 2]
    return TextDataset([r[0] for r in rows], None, [("negative", "positive")[int(r[1])] for r in rows])


READERS: dict[str, Callable[[Path], TextDataset]] = {
    "cola": _cola,
    "mrpc": _mrpc,
    "rte": _rte,
    "qnli": _qnli,
    "trec": _trec,
    "agnews": _agnews,
    "sms_spam": _sms,
    "cb": _cb,
    "sst2": _sst2,
}
#: Meta-training tasks by default: every task but the held-out one.
META_TASKS = tuple(t for t in READERS if t != HELD_OUT)


def load_task(root: str | Path, name: str, limit: int | None = None, seed: int = 0) -> TextDataset:
    """Read task ``name`` from the data folder ``root``; with ``limit``, a seeded random subset of that size.

    Raises:
        DataError: unknown task, or its files missing or malformed under ``root``.
    """
    if name not in READERS:
        raise DataError(f"unknown task {name!r}: known tasks are {', '.join(READERS)}")
    root = Path(root)
    try:
        data = READERS[name](root)
    except (OSError, IndexError, ValueError, KeyError) as exc:
        raise DataError(
            f"cannot read task {name} under {root}: {type(exc).__name__}: {exc}. Pass --data-dir "
            "pointing at the shared data folder (it holds cola/, mrpc/, rte/, ...)"
        ) from None
    data.source = f"{root / name}"
    if not data.texts:
        raise DataError(f"task {name} under {root} has no examples")
    if limit is not None and len(data) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False))
        data = TextDataset(
            [data.texts[i] for i in idx],
            [data.pairs[i] for i in idx] if data.pairs else None,
            [data.labels[i] for i in idx],
            data.source,
        )
    return data
