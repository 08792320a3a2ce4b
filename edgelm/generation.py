"""Text generation on a decoder artifact: prompts, sampling, streaming, perplexity, token agreement, speed.

Runtime side: numpy, ``tokenizers`` and ``jinja2`` only (no torch, no transformers), so that a board with
the runtime install validates and runs a generative bundle. The session is an
:class:`exporters.decoder.DecoderSession` (``forward(tokens int64 [n], pos) -> float32 logits``).

Words: *prefill* feeds the prompt in one call; *decode* feeds one token per call; *TTFT* (time to first
token) is the prefill plus choosing the first token, ms; tokens/s are wall-clock rates; *perplexity* is
exp(mean negative log-likelihood) of each token given the ones before it over a fixed window; *greedy*
decoding takes the arg-max token at every step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The golden prompts: questions and instructions with short, checkable answers.
PROMPTS = (
    "What is the capital of France?",
    "What is 12 times 7?",
    "Name the largest planet in the solar system.",
    "Translate 'good morning' into Spanish.",
    "Who wrote the play Romeo and Juliet?",
    "What is the boiling point of water in degrees Celsius?",
    "Give me three colors of the rainbow.",
    "What does a thermometer measure?",
    "Write one sentence about the ocean.",
    "What is the opposite of 'hot'?",
    "How many days are there in a week?",
    "What gas do plants take in from the air?",
    "Name a mammal that can fly.",
    "What is the chemical symbol for gold?",
    "Summarize in one sentence: the cat sat on the mat and fell asleep.",
    "What is the square root of 81?",
    "Which continent is Egypt in?",
    "What language is spoken in Brazil?",
    "Write a haiku about autumn.",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?",
    "What is the main ingredient of guacamole?",
    "List two programming languages.",
    "What is the tallest mountain on Earth?",
    "Explain what a noun is in one sentence.",
    "How many legs does a spider have?",
    "What is the currency of Japan?",
    "Complete the sentence: The early bird catches the",
    "What is photosynthesis?",
    "Give a synonym for 'happy'.",
    "What is the largest ocean?",
    "Tell me a fun fact about elephants.",
)
#: Files of a generative bundle's tokenizer: the ``tokenizers`` JSON and the chat template (Jinja).
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class PromptError(ValueError):
    """A prompt edgelm cannot run: empty, or longer than the artifact's context."""


class ChatTokenizer:
    """A ``tokenizers`` tokenizer with the model's chat template (rendered with Jinja in a sandbox, as
    transformers' ``apply_chat_template`` does).

    Args:
        directory: holds ``tokenizer.json`` and, for a chat model, ``chat_template.jinja`` (or a
            ``chat_template`` in ``tokenizer_config.json``).
    Raises:
        FileNotFoundError: no ``tokenizer.json``; ValueError: it cannot be parsed.
    """

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a tokenizers JSON file: {exc}") from None
        cfg = {}
        if (directory / TOKENIZER_CONFIG_FILE).is_file():
            cfg = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text())
        template = cfg.get("chat_template")
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text()
        self.chat_template: str | None = template or None
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))

    def render_chat(self, text: str) -> str:
        """The chat template applied to one user turn, with the assistant's turn opened. Raises ValueError
        when the model has no chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template: run without --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": text}],
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text`` (``chat``: of its chat-templated form, whose special tokens are in the text;
        else with the tokenizer's own special tokens)."""
        if chat:
            return list(self._tok.encode(self.render_chat(text), add_special_tokens=False).ids)
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # transformers' AddedToken serialisation
        return value.get("content")
    return value


def check_prompt(ids: list[int], max_new_tokens: int, max_context: int) -> None:
    """Raise PromptError when ``ids`` is empty or leaves no room for a token in the context."""
    if not ids:
        raise PromptError("the prompt is empty: pass some text with --prompt")
    if len(ids) >= max_context:
        raise PromptError(
            f"the prompt is {len(ids)} tokens, the artifact's context is {max_context}: shorten the prompt "
            "(or export with a longer [llm] context_length)"
        )
    if max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens {max_new_tokens}: use 1 or more")


def sample(
    logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None
) -> int:
    """The next token from float32 logits [vocab]: arg-max when ``temperature`` is 0 (greedy), else a draw
    from softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches
    ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0.0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


@dataclass
class Generation:
    """One generation: the new tokens and its speed.

    Attributes:
        tokens: new token ids (the EOS that stopped it included).
        stopped_at_eos: it ended on an EOS id (else on ``max_new_tokens`` or the context).
        prompt_tokens: prompt length, tokens.
        ttft_ms: time to first token, ms (prefill + choosing the first token).
        prefill_tokens_per_s: prompt tokens / prefill time.
        decode_tokens_per_s: tokens after the first / their time (0 when only one was generated).
        first_logits: float32 [vocab], the logits the first new token was chosen from.
        step_ms: wall time of each decode step (one token in, the next chosen), ms.
    """

    tokens: list[int] = field(default_factory=list)
    stopped_at_eos: bool = False
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    first_logits: np.ndarray | None = None
    step_ms: list[float] = field(default_factory=list)


def generate(
    session,
    prompt: list[int],
    max_new_tokens: int,
    *,
    eos_ids: list[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` (token ids), stopping at an ``eos_ids`` token (None:
    the session's) or the context's end; ``on_token`` gets each new id as it is chosen (streaming).
    Raises PromptError for an empty prompt or one that fills the context."""
    check_prompt(prompt, max_new_tokens, session.max_context)
    eos = set(session.eos_ids if eos_ids is None else eos_ids)
    rng = np.random.default_rng(seed)
    out = Generation(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    logits = session.forward(np.asarray(prompt, dtype=np.int64), 0)[-1]
    t_prefill = time.perf_counter() - t0
    out.first_logits = np.asarray(logits, dtype=np.float32)
    pos = len(prompt)
    token = sample(logits, temperature, top_p, rng)
    out.ttft_ms = (time.perf_counter() - t0) * 1000.0
    out.prefill_tokens_per_s = len(prompt) / t_prefill if t_prefill > 0 else 0.0
    t1 = time.perf_counter()
    while True:
        out.tokens.append(token)
        if on_token:
            on_token(token)
        if token in eos:
            out.stopped_at_eos = True
            break
        if len(out.tokens) >= max_new_tokens or pos >= session.max_context:
            break
        ts = time.perf_counter()
        logits = session.forward(np.asarray([token], dtype=np.int64), pos)[-1]
        pos += 1
        token = sample(logits, temperature, top_p, rng)
        out.step_ms.append((time.perf_counter() - ts) * 1000.0)
    steps = len(out.tokens) - 1
    elapsed = time.perf_counter() - t1
    out.decode_tokens_per_s = steps / elapsed if steps and elapsed > 0 else 0.0
    return out


def greedy_tokens(session, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding of ``n`` new tokens (fewer when an EOS comes first) and the logits of the first new
    token (float32 [vocab]): what the golden set records per prompt."""
    gen = generate(session, prompt, n)
    return gen.tokens, gen.first_logits


def perplexity(session, tokens: np.ndarray, chunk: int = 128) -> float:
    """exp(mean negative log-likelihood) of ``tokens[1:]`` (int64 [W]) each given the ones before it, run
    through ``session`` from position 0 (W <= the context). A session that returns every position's
    logits is fed ``chunk`` tokens per call; one that returns the last position's is fed one at a time."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    nll, count, pos = 0.0, 0, 0
    step = chunk if session.full_logits else 1
    while pos < len(tokens) - 1:
        feed = tokens[pos : min(pos + step, len(tokens) - 1)]
        logits = session.forward(feed, pos).astype(np.float64)
        targets = tokens[pos + 1 : pos + 1 + len(feed)]
        logits = logits[-len(feed) :] if len(logits) >= len(feed) else logits
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        pos += len(feed)
    return math.exp(nll / count)


def speed(session, prompt: list[int], new_tokens: int) -> dict:
    """Prefill and decode speed: ``prompt`` in one call, then ``new_tokens`` greedy decode steps whatever the
    tokens are (EOS does not stop it). Returns ``prefill_tokens_per_s``, ``ttft_ms``, ``decode_tokens_per_s``,
    the token counts and ``step_ms`` (each decode step, ms)."""
    gen = generate(session, prompt, new_tokens, eos_ids=[])
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(gen.tokens),
        "prefill_tokens_per_s": gen.prefill_tokens_per_s,
        "ttft_ms": gen.ttft_ms,
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "step_ms": gen.step_ms,
    }


def pad_tokens(rows: list[list[int]], width: int) -> np.ndarray:
    """Token rows as int64 [len(rows), width], padded with -1 (the golden set's layout)."""
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:width]
    return out


def unpad(row: np.ndarray) -> list[int]:
    """A -1-padded token row as a list."""
    return [int(x) for x in row if x >= 0]


def token_agreement(reference: np.ndarray, tokens: np.ndarray) -> dict:
    """Greedy tokens of an artifact against the reference's, both int [P, L] padded with -1.

    Returns ``agreement`` (share of prompts whose tokens are all equal, [0, 1]), ``mean_prefix`` (mean number
    of tokens before the first difference) and ``prompts``."""
    same, prefix = 0, []
    for ref, got in zip(reference, tokens, strict=True):
        r, g = unpad(ref), unpad(got)
        n = next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
        prefix.append(n)
        same += int(r == g)
    return {
        "agreement": same / max(len(reference), 1),
        "mean_prefix": float(np.mean(prefix)) if prefix else 0.0,
        "prompts": len(reference),
    }
