"""Early-exit cascades: one model split into segment artifacts of one format, run in order, stopping at the
first exit (off-ramp) whose prediction is confident enough.

A cascade is a JSON file ``<artifact>.exits.json`` (e.g. ``classifier-int8_dynamic.onnx.exits.json``) beside
its segment artifacts (``classifier-int8_dynamic.seg0.onnx`` ...). Segment 0 takes ``input_ids`` and
``attention_mask`` and runs the embeddings and the first layers; segment k > 0 takes ``hidden_states``
(float32 [1, seq, hidden], the previous segment's ``hidden_out``) and ``attention_mask``; every segment but
the last returns ``(hidden_out, logits)``, the last returns ``logits`` (float32 [1, num_labels]).

The policy is DeeBERT's (Xin et al., ACL 2020, "DeeBERT: Dynamic Early Exiting for Accelerating BERT
Inference"): after each segment its exit's confidence is measured, ``"max_prob"`` (the largest softmax
probability; exit when >= ``threshold``) or ``"entropy"`` (of the softmax, nats; exit when <= ``threshold``),
and the first confident exit answers. The last segment always answers. Chained without exiting, the
segments compute exactly the whole model.

This module imports neither torch nor edgelm (ExecuTorch's own Python runtime imports torch itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import ArtifactLoadError, sha256_file, split_rows, trim_padding

#: Suffix of a cascade's description file (after the whole model artifact's name).
SUFFIX = ".exits.json"
SCHEMA = "edgelm.early_exit/1"
#: Confidence measures of an exit: ``max_prob`` (higher is surer) and ``entropy`` (lower is surer).
CONFIDENCES = ("max_prob", "entropy")


def is_cascade(path: str | Path) -> bool:
    """Whether ``path`` names a cascade description (``*.exits.json``)."""
    return Path(path).name.endswith(SUFFIX)


def inner_name(path: str | Path) -> str:
    """The artifact name a cascade stands for: ``m.onnx.exits.json`` -> ``m.onnx`` (its suffix is the format's)."""
    name = Path(path).name
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits [N, C] -> float64 [N, C]."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def confidence(logits: np.ndarray, measure: str) -> np.ndarray:
    """Confidence of each row of logits [N, C] -> float64 [N]: the largest softmax probability (``max_prob``,
    0-1) or the softmax entropy (``entropy``, nats). Raises ValueError for an unknown measure."""
    p = softmax(logits)
    if measure == "max_prob":
        return p.max(axis=-1)
    if measure == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)
    raise ValueError(f"unknown confidence measure {measure!r}: use {' or '.join(CONFIDENCES)}")


def never_exit(measure: str) -> float:
    """A threshold with which no exit but the last ever answers (max softmax probability cannot reach 1.01, an
    entropy cannot fall below -1)."""
    return 1.01 if measure == "max_prob" else -1.0


def confident(conf: np.ndarray, measure: str, threshold: float) -> np.ndarray:
    """Whether each confidence passes ``threshold`` (``max_prob``: >=; ``entropy``: <=) -> bool [N]."""
    return conf >= threshold if measure == "max_prob" else conf <= threshold


def exit_choice(exit_logits: list[np.ndarray], measure: str, threshold: float) -> np.ndarray:
    """Which exit answers each row, given every exit's logits (a list, one float [N, C] per exit, the last
    exit last) -> int64 [N] exit indices. The same rule :class:`CascadeSession` applies one row at a time."""
    n = len(exit_logits[0])
    chosen = np.full(n, len(exit_logits) - 1, dtype=np.int64)
    open_rows = np.ones(n, dtype=bool)
    for k, logits in enumerate(exit_logits[:-1]):
        hit = open_rows & confident(confidence(logits, measure), measure, threshold)
        chosen[hit] = k
        open_rows &= ~hit
    return chosen


@dataclass(frozen=True)
class Segment:
    """One segment of a cascade: its file, the encoder layers it runs (1-based, inclusive ``first``..``last``)
    and its file's sha256."""

    file: str
    first_layer: int
    last_layer: int
    sha256: str


@dataclass(frozen=True)
class Cascade:
    """A cascade description (the ``.exits.json`` file), see the module docstring.

    Attributes:
        format: the segments' format (``"onnx"``, ``"executorch"``, ``"tflite"``).
        segments: in order; ``segments[k].last_layer`` is exit k's layer.
        confidence / threshold: the exit policy (:data:`CONFIDENCES`).
        output_name: the logits output's name (``"logits"``).
        num_layers: encoder layers of the whole model.
    """

    format: str
    segments: tuple[Segment, ...]
    confidence: str
    threshold: float
    output_name: str
    num_layers: int

    @property
    def exit_layers(self) -> list[int]:
        return [s.last_layer for s in self.segments]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "format": self.format,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "output_name": self.output_name,
            "num_layers": self.num_layers,
            "exit_layers": self.exit_layers,
            "segments": [s.__dict__ for s in self.segments],
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Cascade:
        """Read and check a description: schema, policy, and segment files that are plain names (they stay in
        the cascade's folder). Raises ArtifactLoadError."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactLoadError(f"early-exit cascade not found: {path}")
        try:
            d = json.loads(path.read_text())
            if d.get("schema") != SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r} is not {SCHEMA}")
            segments = tuple(
                Segment(str(s["file"]), int(s["first_layer"]), int(s["last_layer"]), str(s["sha256"]))
                for s in d["segments"]
            )
            c = cls(
                str(d["format"]),
                segments,
                str(d["confidence"]),
                float(d["threshold"]),
                str(d["output_name"]),
                int(d["num_layers"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactLoadError(f"{path.name} is not an early-exit cascade edgelm can read: {exc}") from None
        if c.confidence not in CONFIDENCES:
            raise ArtifactLoadError(f"{path.name}: unknown confidence {c.confidence!r}; use {' or '.join(CONFIDENCES)}")
        if not segments or any(Path(s.file).name != s.file or s.file in ("", ".", "..") for s in segments):
            raise ArtifactLoadError(f"{path.name}: segment files must be plain names inside the cascade's folder")
        return c


class CascadeSession:
    """An early-exit cascade loaded in its segments' runtime.

    ``run(feeds)``: ``input_ids``/``attention_mask`` int [batch, seq] -> ``{output_name: float32 [batch,
    num_labels], "exit_layer": float32 [batch]}`` (the encoder layer whose exit answered each row); rows run
    one at a time, their padding trimmed. ``threshold`` can be changed between calls (a sweep); ``run_all``
    returns every exit's logits without exiting (segments chained equal the whole model); ``sessions`` are the
    segments' own sessions, in order (a benchmark times them one by one). The segments' sha256 are checked
    before loading.
    """

    def __init__(self, path: Path, threads: int | None = None):
        import exporters

        path = Path(path)
        self.cascade = Cascade.read(path)
        self.threshold = self.cascade.threshold
        self.sessions = []
        for i, seg in enumerate(self.cascade.segments):
            f = path.parent / seg.file
            got = sha256_file(f) if f.is_file() else "missing"
            if got != seg.sha256:
                raise ArtifactLoadError(
                    f"segment {seg.file}: sha256 {got[:12]}, {path.name} says {seg.sha256[:12]}: not loaded"
                )
            # ExecuTorch's XNNPACK thread pool is one per process: set it once, before the first segment
            same_pool = self.cascade.format == "executorch" and i > 0
            self.sessions.append(exporters.load(f, threads=None if same_pool else threads))
        self.input_names = ["input_ids", "attention_mask"]
        self.output_names = [self.cascade.output_name, "exit_layer"]

    def _row(self, row: dict[str, np.ndarray], stop: bool) -> list[np.ndarray]:
        mask = row["attention_mask"]
        feeds = {"input_ids": row["input_ids"], "attention_mask": mask}
        name, c = self.cascade.output_name, self.cascade
        logits_seen = []
        for k, session in enumerate(self.sessions):
            out = session.run(feeds)
            logits_seen.append(out[name])
            last = k == len(self.sessions) - 1
            if last or (stop and confident(confidence(out[name], c.confidence), c.confidence, self.threshold)[0]):
                break
            feeds = {"hidden_states": out["hidden_out"], "attention_mask": mask}
        return logits_seen

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits, layers = [], []
        for row in split_rows(feeds):
            seen = self._row(trim_padding(row), stop=True)
            logits.append(seen[-1])
            layers.append(self.cascade.segments[len(seen) - 1].last_layer)
        return {
            self.cascade.output_name: np.concatenate(logits, axis=0).astype(np.float32),
            "exit_layer": np.asarray(layers, dtype=np.float32),
        }

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every exit's logits without exiting: a list (one float32 [batch, num_labels] per exit)."""
        rows = [self._row(trim_padding(row), stop=False) for row in split_rows(feeds)]
        return [np.concatenate([r[k] for r in rows], axis=0).astype(np.float32) for k in range(len(rows[0]))]


def load(path: Path, threads: int | None = None) -> CascadeSession:
    """Open an early-exit cascade (``*.exits.json``). Raises ArtifactLoadError or RuntimeNotInstalledError."""
    return CascadeSession(path, threads)
