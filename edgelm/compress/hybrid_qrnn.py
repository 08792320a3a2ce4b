"""Hybrid RNN-Transformer students: selected attention blocks of a causal LM replaced by QRNN layers.

Method: Lindenmaier, Papay & Padó 2025, "Efficient Language Modeling for Low-Resource Settings with Hybrid
RNN-Transformer Architectures" (arXiv:2502.00617): some attention layers of a transformer LM become
quasi-recurrent layers. The QRNN (Bradbury, Merity, Xiong & Socher, ICLR 2017, "Quasi-Recurrent Neural
Networks", arXiv:1611.01576) computes its gates with a causal convolution over the inputs (window ``w``),
Z = tanh, F = sigmoid, O = sigmoid, then "fo-pooling" c_t = f_t * c_{t-1} + (1 - f_t) * z_t, h_t = o_t * c_t.
Its state (c and the last ``w - 1`` inputs) has a constant size, where an attention layer's KV cache grows
with the context.

Here (``edgelm compress --method hybrid-qrnn``):

1. **Which layers** (:func:`attention_importance`): each attention block's output is dropped in turn and the
   perplexity of the teacher measured on held-out calibration windows of the training text; the blocks whose
   loss costs the least are replaced (the attention-drop importance of He et al. 2024, "What Matters in
   Transformers? Not All Attention is Needed", arXiv:2406.15786), unless the layers are given.
2. **Initialisation**: a QRNN block's candidate (z) weights start from the attention block's value
   projection (repeated per query head when KV heads are shared), its output projection is the attention's
   own, and its forget gate starts at a running average: with the attention weights uniform over the past,
   the attention block *is* a running average of its values.
3. **Layer-local distillation** (:func:`train_hybrid`): each QRNN block learns to reproduce its attention
   block's output on the teacher's own hidden states (MSE normalised by the output's variance), all blocks at
   once from one teacher pass per batch; then a short **end-to-end distillation** of the whole hybrid from
   the teacher's logits (KL, temperature 1), the QRNN blocks trained, everything else frozen.

Checkpoint layout: the teacher's Hugging Face checkpoint (it is also the reference the hybrid is validated
against), ``hybrid_qrnn.json`` (replaced layers, window, the importance measurements, the training history)
``qrnn.safetensors`` (the QRNN blocks' weights, ``layers.{i}.*``) and ``logs/compress.log``. :func:`load_hybrid` refuses one whose
weights do not cover the QRNN blocks it names.

The sequence form (:meth:`QRNN.forward`, a prefill or training: the gates of all positions at once, then
fo-pooling as one loop with its gradient written out) and the recurrent form (:meth:`QRNN.step`, one decode
step in O(1)) compute the same outputs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import DataError, ModelError, RecipeError

CONFIG_FILE = "hybrid_qrnn.json"
WEIGHTS_FILE = "qrnn.safetensors"
SCHEMA = "edgelm.hybrid_qrnn/1"


def build_classes():
    """The torch classes (defined lazily so that importing this module does not import torch)."""
    import torch
    from torch import nn

    class QRNN(nn.Module):
        """A QRNN layer standing in for an attention block: x float32 [B, T, H] -> float32 [B, T, H].

        Gates from a causal convolution of width ``window`` (a linear map of the current and the previous
        ``window - 1`` inputs), fo-pooling, then the output projection. ``inner``: the width of z, f, o (the
        attention's ``num_heads * head_dim``)."""

        def __init__(self, hidden: int, inner: int, window: int = 2):
            super().__init__()
            self.hidden, self.inner, self.window = hidden, inner, window
            self.gates = nn.Linear(hidden * window, 3 * inner)
            self.o_proj = nn.Linear(inner, hidden, bias=False)

        def _gates(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z, f, o = self.gates(windows).chunk(3, dim=-1)
            return torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)

        def _windows(self, x: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
            """[B, T, H] inputs (and the ``window - 1`` before them, zeros at the start) -> [B, T, w * H], the
            oldest input first."""
            b, t, h = x.shape
            if past is None:
                past = x.new_zeros(b, self.window - 1, h)
            seq = torch.cat([past, x], dim=1)
            return torch.cat([seq[:, k : k + t] for k in range(self.window)], dim=-1)

        def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
            """The sequence form over T positions. ``state``: (c float32 [B, inner], past inputs [B, w - 1, H])
            from before (None: the start). Returns h [B, T, H]; :meth:`scan` also returns the new state."""
            return self.scan(x, state)[0]

        def scan(self, x: torch.Tensor, state=None):
            """:meth:`forward` that also returns the state after the last position (a prefill's)."""
            b, _, h = x.shape
            c0, past = (None, x.new_zeros(b, self.window - 1, h)) if state is None else state
            z, f, o = self._gates(self._windows(x, past))
            c = fo_pool(z, f, c0)
            seen = torch.cat([past, x], dim=1)
            return self.o_proj(o * c), (c[:, -1], seen[:, seen.shape[1] - (self.window - 1) :])

        def step(self, x: torch.Tensor, state=None):
            """One position, recurrently: x [B, 1, H] -> (h [B, 1, H], new state); O(1) in the position."""
            b, _, h = x.shape
            c0, past = (x.new_zeros(b, self.inner), x.new_zeros(b, self.window - 1, h)) if state is None else state
            z, f, o = self._gates(torch.cat([past, x], dim=1).reshape(b, 1, -1))
            c = f[:, 0] * c0 + (1 - f[:, 0]) * z[:, 0]
            new_past = torch.cat([past, x], dim=1)[:, 1:]
            return self.o_proj((o[:, 0] * c).unsqueeze(1)), (c, new_past)

    class QRNNAttention(nn.Module):
        """A decoder layer's ``self_attn`` replaced: the same call, ``(output, None)`` (the position embeddings
        and mask are not needed).

        With transformers' cache (``cache``/``past_key_values``, generation with ``use_cache=True``) the QRNN
        state of layer ``layer_idx`` rides on the cache object: a call whose cache holds no position yet starts
        from zeros, later calls continue from the state the previous one left (a prefill, then decode steps).
        The layer also records one float per position in the cache (keys and values [B, 1, T, 1]) so that the
        cache's length stays right whichever layers are QRNNs. Without a cache: the sequence form from zeros."""

        def __init__(self, qrnn: QRNN, layer_idx: int = 0):
            super().__init__()
            self.qrnn, self.layer_idx = qrnn, layer_idx

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is None:
                return self.qrnn(hidden_states), None
            states = cache.__dict__.setdefault("edgelm_qrnn_states", {})
            state = states.get(self.layer_idx) if cache.get_seq_length(self.layer_idx) > 0 else None
            out, states[self.layer_idx] = self.qrnn.scan(hidden_states, state)
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(mark, mark, self.layer_idx)
            return out, None

    class DroppedAttention(nn.Module):
        """An attention block whose output is dropped (zeros): the importance measurement."""

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
            return torch.zeros_like(hidden_states), None

    class FoPool(torch.autograd.Function):
        """fo-pooling with its gradient written out: the forward and backward are plain loops over the
        positions with no autograd graph per step (on a CPU several times faster than autograd through a
        loop or a parallel scan). Backward of c_t = f_t c_{t-1} + (1 - f_t) z_t with g_t = dL/dc_t (the
        output's gradient plus f_{t+1} g_{t+1}): dz_t = g_t (1 - f_t), df_t = g_t (c_{t-1} - z_t),
        dc_0 = f_1 g_1."""

        @staticmethod
        def forward(ctx, z, f, c0):
            c = torch.empty_like(z)
            prev = c0
            for t in range(z.shape[1]):
                prev = torch.addcmul(z[:, t], f[:, t], prev - z[:, t])  # z + f (c - z)
                c[:, t] = prev
            ctx.save_for_backward(z, f, c0, c)
            return c

        @staticmethod
        def backward(ctx, grad):
            z, f, c0, c = ctx.saved_tensors
            dz, df = torch.empty_like(z), torch.empty_like(f)
            carry = torch.zeros_like(c0)
            for t in range(z.shape[1] - 1, -1, -1):
                g = grad[:, t] + carry
                prev = c[:, t - 1] if t > 0 else c0
                dz[:, t] = g * (1 - f[:, t])
                df[:, t] = g * (prev - z[:, t])
                carry = g * f[:, t]
            return dz, df, carry

    def fo_pool(z: torch.Tensor, f: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
        """c_t = f_t * c_{t-1} + (1 - f_t) * z_t for all t: z, f float32 [B, T, D], c0 [B, D] or None (zeros)
        -> c [B, T, D] (:class:`FoPool`)."""
        c0 = z.new_zeros(z.shape[0], z.shape[2]) if c0 is None else c0
        return FoPool.apply(z.contiguous(), f.contiguous(), c0.contiguous())

    return QRNN, QRNNAttention, DroppedAttention, fo_pool


# ---------------------------------------------------------------- the model


def _layers(model: Any) -> Any:
    return model.model.layers


def attention_dims(model: Any) -> tuple[int, int, int, int]:
    """(hidden, num_heads * head_dim, num_heads, num_kv_heads) of a Llama-family causal LM."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.hidden_size), heads * head_dim, heads, int(getattr(cfg, "num_key_value_heads", heads) or heads)


def qrnn_from_attention(attn: Any, model: Any, window: int) -> Any:
    """A QRNN block initialised from attention block ``attn`` (see the module docstring, step 2)."""
    import torch

    QRNN, *_ = build_classes()
    hidden, inner, heads, kv_heads = attention_dims(model)
    q = QRNN(hidden, inner, window)
    with torch.no_grad():
        q.gates.weight.zero_()
        q.gates.bias.zero_()
        v = attn.v_proj.weight  # [kv_heads * head_dim, hidden]
        head_dim = inner // heads
        v = v.view(kv_heads, head_dim, hidden).repeat_interleave(heads // kv_heads, dim=0).reshape(inner, hidden)
        current = slice((window - 1) * hidden, window * hidden)  # the newest input's columns
        q.gates.weight[:inner, current] = v
        if getattr(attn.v_proj, "bias", None) is not None:
            b = attn.v_proj.bias.view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=0).reshape(inner)
            q.gates.bias[:inner] = b
        q.gates.bias[inner : 2 * inner] = 2.0  # forget gate ~0.88: a running average over the recent past
        q.gates.bias[2 * inner :] = 4.0  # output gate ~0.98: open
        q.o_proj.weight.copy_(attn.o_proj.weight)
    return q


def make_hybrid(model: Any, layers: list[int], window: int = 2) -> Any:
    """Replace the self-attention of ``layers`` (0-based) of ``model`` (a transformers Llama-family causal LM)
    by QRNN blocks initialised from them, in place. Returns ``model``. Raises RecipeError for a layer outside
    the model."""
    _, QRNNAttention, _, _ = build_classes()
    n = len(_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise RecipeError(f"--replace {bad}: the model has layers 0..{n - 1}")
    for i in layers:
        layer = _layers(model)[i]
        layer.self_attn = QRNNAttention(qrnn_from_attention(layer.self_attn, model, window), i)
    return model


def qrnn_blocks(model: Any) -> dict[int, Any]:
    """The QRNN blocks of a hybrid by layer index (0-based)."""
    _, QRNNAttention, _, _ = build_classes()
    return {
        i: layer.self_attn.qrnn
        for i, layer in enumerate(_layers(model))
        if type(layer.self_attn).__name__ == QRNNAttention.__name__
    }


# ---------------------------------------------------------------- data


#: Files refused as training text: the WikiText-2 test set is where perplexity is measured.
HELD_OUT_NAMES = ("wiki.test.raw", "wiki.test.tokens")


def read_text(paths: list[str | os.PathLike]) -> list[str]:
    """Training text from files: a plain text file (``.txt``, ``.raw``, ``.tokens``) is one text, as written
    (its line breaks and WikiText's ``= heading =`` lines kept: the perplexity is measured on the test file read
    the same way), and a TSV/CSV/JSONL dataset edgelm reads gives one text per row (its text column). Raises
    DataError for a missing file, an empty one, or the WikiText-2 test set (the perplexity benchmark's)."""
    from edgelm.data import load_dataset

    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.name in HELD_OUT_NAMES:
            raise DataError(
                f"{path}: the WikiText-2 test set is where the hybrid's perplexity is measured; train on other "
                "text (e.g. ../shared/data/wikitext2/tokenized/wiki.valid.tokens, SST-2 or AG News sentences)"
            )
        if not path.is_file():
            raise DataError(f"training text not found: {path}")
        if path.suffix in (".txt", ".raw", ".tokens"):
            text = path.read_text(encoding="utf-8", errors="replace")
            out += [text] if text.strip() else []
        else:
            out += list(load_dataset(str(path)).texts)
    if not out:
        raise DataError(f"no text in {', '.join(str(p) for p in paths)}")
    return out


def token_windows(tokenizer: Any, texts: list[str], seq_len: int, limit: int | None = None) -> np.ndarray:
    """The texts tokenized and packed end to end (EOS between them), cut into windows: int64 [N, seq_len].
    Raises DataError when there is not one window of text."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if limit is not None and len(ids) >= (limit + 1) * seq_len:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the training text has {len(ids)} tokens: fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# ---------------------------------------------------------------- measuring


def token_nll(model: Any, windows: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Negative log-likelihood (nats) of each next token: float64 [N, T - 1] for token windows int64 [N, T]
    (column j is the loss of predicting token j + 1 from tokens 0..j, so columns are positions in the context)."""
    import torch

    rows = []
    with torch.no_grad():
        for s in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[s : s + batch_size])
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            rows.append(loss.double().numpy())
    return np.concatenate(rows)


def perplexity(model: Any, windows: np.ndarray, batch_size: int = 4) -> float:
    """Perplexity of ``model`` over token windows int64 [N, T] (each window's first token is context only)."""
    return math.exp(float(token_nll(model, windows, batch_size).mean()))


def attention_importance(model: Any, windows: np.ndarray, progress=None, batch_size: int = 4) -> list[float]:
    """Per layer (0-based), the teacher's perplexity on ``windows`` int64 [N, T] with that layer's attention
    output dropped (He et al. 2024's attention-drop importance: the lower, the cheaper to replace).

    One teacher pass per batch keeps every decoder layer's input; layer i's measurement then runs only layers
    i..L-1 from it (the layers before are unchanged), half the work of a whole pass per layer.
    ``progress(done, total)`` after each layer of each batch (total = layers × batches)."""
    import torch

    _, _, DroppedAttention, _ = build_classes()
    layers = _layers(model)
    n = len(layers)
    total, count = [0.0] * n, 0
    with torch.no_grad():
        for s in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[s : s + batch_size])
            seen: dict[int, tuple] = {}
            hooks = [
                layer.register_forward_pre_hook(
                    lambda m, a, k, i=i, seen=seen: seen.__setitem__(i, (a, k)), with_kwargs=True
                )
                for i, layer in enumerate(layers)
            ]
            try:
                model(input_ids=ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            count += ids[:, 1:].numel()
            for i in range(n):
                args, kwargs = seen[i]
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kept, layers[i].self_attn = layers[i].self_attn, DroppedAttention()
                try:
                    for j in range(i, n):
                        hidden = layers[j](hidden, *args[1:], **rest)
                finally:
                    layers[i].self_attn = kept
                logits = model.lm_head(model.model.norm(hidden))[:, :-1]
                total[i] += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                    )
                )
                if progress:
                    progress(s // batch_size * n + i + 1, n * -(-len(windows) // batch_size))
    return [math.exp(t / count) for t in total]


def choose_layers(importance: list[float], replace: float | list[int], num_layers: int) -> list[int]:
    """The layers to replace (0-based, sorted): ``replace`` a share (0-1] of the layers, those with the lowest
    attention-drop perplexity (ties: the later layer), or an explicit list. The first layer is never chosen
    by share: dropping it is catastrophic in every model we measured and its tokens have no past to average.
    Raises RecipeError for a share outside (0, 1) or an empty list."""
    if isinstance(replace, list):
        if not replace:
            raise RecipeError("--replace: give a share of layers (e.g. 0.5) or layer numbers (e.g. 3,5,7)")
        bad = [i for i in replace if not 0 <= i < num_layers]
        if bad:
            raise RecipeError(f"--replace {bad}: the model has layers 0..{num_layers - 1}")
        return sorted(set(replace))
    if not 0 < replace < 1:
        raise RecipeError(f"--replace {replace}: a share of the attention layers must be above 0 and below 1")
    n = max(1, round(replace * num_layers))
    order = sorted(range(1, num_layers), key=lambda i: (importance[i], -i))
    return sorted(order[:n])


# ---------------------------------------------------------------- training


@dataclass
class HybridConfig:
    """``edgelm compress --method hybrid-qrnn`` settings.

    Attributes:
        replace: share of attention layers to replace (0-1) or 0-based layer indices.
        window: the QRNN's convolution width (positions).
        seq_len: training window, tokens.
        local_steps / e2e_steps: steps of layer-local and of end-to-end distillation.
        local_windows: training windows whose teacher activations the layer-local steps learn from (one
            teacher pass; float32 activations of every replaced layer are held in memory).
        batch_size: windows per step.
        lr / e2e_lr: AdamW learning rates.
        calibration_windows: held-out windows for the layer choice and the perplexity shown.
        limit: most training windows read.
        seed: data order and initialisation.
    """

    replace: float | list[int] = 0.5
    window: int = 2
    seq_len: int = 128
    local_steps: int = 1000
    e2e_steps: int = 100
    local_windows: int = 96
    batch_size: int = 4
    lr: float = 2e-3
    e2e_lr: float = 3e-4
    calibration_windows: int = 16
    limit: int | None = 2000
    seed: int = 0

    def check(self) -> None:
        """Raises RecipeError for values training cannot use."""
        for name in ("window", "seq_len", "batch_size", "calibration_windows", "local_windows"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be at least 1")
        for name in ("local_steps", "e2e_steps"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} must be 0 or more")
        if not (self.lr > 0 and self.e2e_lr > 0):
            raise RecipeError("learning rates must be positive")
        if not isinstance(self.replace, list) and not 0 < self.replace < 1:
            raise RecipeError(f"--replace {self.replace}: a share of the attention layers must be above 0 and below 1")


@dataclass
class HybridResult:
    """What ``hybrid_qrnn.json`` records (see :func:`train_hybrid`)."""

    replaced_layers: list[int]
    num_layers: int
    window: int
    importance_perplexity: list[float]
    teacher_perplexity: float
    hybrid_perplexity_init: float
    hybrid_perplexity_local: float
    hybrid_perplexity: float
    local_loss: list[float] = field(default_factory=list)
    e2e_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    train_windows: int = 0
    calibration_windows: int = 0
    data: list[str] = field(default_factory=list)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_hybrid(model: Any, windows: np.ndarray, calib: np.ndarray, cfg: HybridConfig, progress=None) -> HybridResult:
    """Turn ``model`` (a transformers Llama-family causal LM, float32) into a hybrid in place and train it.

    Args:
        windows: training token windows int64 [N, seq_len].
        calib: held-out windows int64 [M, seq_len] (layer choice and the perplexities reported).
        progress: ``progress(description, done, total)``.
    Returns: a :class:`HybridResult`. Raises RecipeError for bad settings.
    """
    import copy

    import torch

    from edgelm.compress.train import optimizer_step

    cfg.check()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = len(_layers(model))

    def say(desc, done, total):
        if progress:
            progress(desc, done, total)

    teacher_ppl = perplexity(model, calib)
    if isinstance(cfg.replace, list):
        importance: list[float] = []
    else:
        importance = attention_importance(model, calib, lambda i, n: say("measuring each attention layer", i, n))
    layers = choose_layers(importance, cfg.replace, n_layers)
    teacher = copy.deepcopy(model)
    make_hybrid(model, layers, cfg.window)
    blocks = qrnn_blocks(model)
    init_ppl = perplexity(model, calib)

    # layer-local: each block reproduces its attention block's output on the teacher's own hidden states, taken
    # once for `local_windows` windows (one teacher pass), then many cheap steps of the blocks alone
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    targets: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def keep(i):
        def hook(mod, args, kwargs, out):
            inputs[i].append(kwargs.get("hidden_states", args[0] if args else None).detach())
            targets[i].append(out[0].detach())

        return hook

    hooks = [_layers(teacher)[i].self_attn.register_forward_hook(keep(i), with_kwargs=True) for i in layers]
    local = windows[: cfg.local_windows]
    try:
        with torch.no_grad():
            for s in range(0, len(local), cfg.batch_size):
                teacher.model(input_ids=torch.from_numpy(local[s : s + cfg.batch_size]), use_cache=False)
                say("teacher activations for layer-local distillation", min(s + cfg.batch_size, len(local)), len(local))
    finally:
        for h in hooks:
            h.remove()
    xs = {i: torch.cat(v) for i, v in inputs.items()}
    ys = {i: torch.cat(v) for i, v in targets.items()}
    scale = {i: ys[i].var().clamp_min(1e-8) for i in layers}
    inputs.clear()
    targets.clear()
    params = [p for b in blocks.values() for p in b.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(1, cfg.local_steps))
    )
    local_loss = []
    for step, idx in enumerate(_batches(len(local), cfg.batch_size, cfg.local_steps, rng)):
        rows = torch.from_numpy(idx)
        loss = sum(torch.nn.functional.mse_loss(blocks[i](xs[i][rows]), ys[i][rows]) / scale[i] for i in layers) / len(
            layers
        )
        local_loss.append(optimizer_step(loss, opt, params, sched))
        say("layer-local distillation", step + 1, cfg.local_steps)
    del xs, ys
    local_ppl = perplexity(model, calib)

    # end to end: the hybrid's logits to the teacher's (KL), the QRNN blocks trained
    opt = torch.optim.AdamW(params, lr=cfg.e2e_lr, weight_decay=0.0)
    e2e_loss = []
    model.train()
    for step, idx in enumerate(_batches(len(windows), cfg.batch_size, cfg.e2e_steps, rng)):
        ids = torch.from_numpy(windows[idx])
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits, -1)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits, -1)
        loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean") / ids.shape[1]
        e2e_loss.append(optimizer_step(loss, opt, params))
        say("end-to-end distillation", step + 1, cfg.e2e_steps)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return HybridResult(
        replaced_layers=layers,
        num_layers=n_layers,
        window=cfg.window,
        importance_perplexity=importance,
        teacher_perplexity=teacher_ppl,
        hybrid_perplexity_init=init_ppl,
        hybrid_perplexity_local=local_ppl,
        hybrid_perplexity=perplexity(model, calib),
        local_loss=local_loss,
        e2e_loss=e2e_loss,
        seconds=time.perf_counter() - start,
        train_windows=len(windows),
        calibration_windows=len(calib),
    )


# ---------------------------------------------------------------- the job and the checkpoint


def run_hybrid_qrnn(
    model: str | os.PathLike,
    data: list[str | os.PathLike],
    out: str | os.PathLike,
    cfg: HybridConfig | None = None,
    progress=None,
) -> HybridResult:
    """``edgelm compress --method hybrid-qrnn``: load the causal LM ``model`` (packaged name, GGUF, checkpoint),
    read ``data`` (training text; see :func:`read_text`), turn it into a trained hybrid (:func:`train_hybrid`)
    and write the checkpoint to ``out`` (see the module docstring; written whole or not at all).

    Raises ModelError (missing or unsupported model), DataError (bad text), RecipeError (bad settings).
    """
    from safetensors.torch import save_file

    from edgelm import fsutil
    from edgelm.causal_lm import load_causal_lm, save_hf_checkpoint
    from edgelm.fsutil import captured_output

    cfg = cfg or HybridConfig()
    cfg.check()
    texts = read_text(data)
    done: list[HybridResult] = []

    def fill(tmp: Path) -> None:
        (tmp / "logs").mkdir()
        # third-party output (the GGUF conversion's progress bar, the checkpoint writer's) goes to the log
        with captured_output(tmp / "logs" / "compress.log"):
            if progress:
                progress("loading the model", 0, 1)
            lm = load_causal_lm(model)
            if isinstance(cfg.replace, list):  # layer numbers checked before the long work
                choose_layers([], cfg.replace, len(_layers(lm.model)))
            limit = None if cfg.limit is None else cfg.limit + cfg.calibration_windows
            windows = token_windows(lm.tokenizer, texts, cfg.seq_len, limit)
            if len(windows) < cfg.calibration_windows + 1:
                raise DataError(
                    f"the training text gives {len(windows)} windows of {cfg.seq_len} tokens: at least "
                    f"{cfg.calibration_windows + 1} are needed ({cfg.calibration_windows} held out to measure)"
                )
            order = np.random.default_rng(cfg.seed).permutation(len(windows))
            calib, train = windows[order[: cfg.calibration_windows]], windows[order[cfg.calibration_windows :]]
            save_hf_checkpoint(lm, tmp)  # the teacher, before the model is changed in place
            result = train_hybrid(lm.model, train, calib, cfg, progress)
            result.data = [str(Path(p).resolve()) for p in data]
            state = {
                f"layers.{i}.{k}": v.detach().contiguous()
                for i, b in qrnn_blocks(lm.model).items()
                for k, v in b.state_dict().items()
            }
            save_file(state, str(tmp / WEIGHTS_FILE))
            doc = {"schema": SCHEMA, "teacher": lm.describe(), "config": asdict(cfg), **asdict(result)}
            (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
            done.append(result)

    fsutil.write_directory(out, fill)
    return done[0]


def read_hybrid_config(directory: str | os.PathLike) -> dict | None:
    """``hybrid_qrnn.json`` of a checkpoint, or None when it has none. Raises ModelError when unreadable."""
    from edgelm.fsutil import read_json_sidecar

    path = Path(directory) / CONFIG_FILE
    again = "run `edgelm compress --method hybrid-qrnn` again"
    doc = read_json_sidecar(path, again)
    if doc is None:
        return None
    try:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r} is not {SCHEMA}")
        doc["replaced_layers"] = [int(i) for i in doc["replaced_layers"]]
        doc["window"] = int(doc["window"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is corrupt ({exc}): {again}") from None
    return doc


def load_hybrid(directory: str | os.PathLike) -> tuple[Any, Any, dict]:
    """A hybrid checkpoint as (hybrid model, its teacher: the CausalLM read from the same folder, config).
    Raises ModelError for a checkpoint without ``hybrid_qrnn.json``, or whose ``qrnn.safetensors`` does not
    cover every QRNN block it names (or has tensors of another shape)."""
    import copy

    from safetensors.torch import load_file

    from edgelm.causal_lm import load_causal_lm

    directory = Path(directory)
    doc = read_hybrid_config(directory)
    if doc is None:
        raise ModelError(f"{directory} is not a hybrid QRNN checkpoint (no {CONFIG_FILE})")
    teacher = load_causal_lm(directory)
    model = make_hybrid(copy.deepcopy(teacher.model), doc["replaced_layers"], doc["window"])
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{weights} is missing: the QRNN blocks' weights; run the compress command again")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ModelError(f"{weights} is corrupt ({exc})") from None
    for i, block in qrnn_blocks(model).items():
        want = block.state_dict()
        got = {k[len(f"layers.{i}.") :]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        missing = sorted(set(want) - set(got))
        wrong = sorted(k for k in set(want) & set(got) if tuple(want[k].shape) != tuple(got[k].shape))
        if missing or wrong:
            raise ModelError(
                f"{weights} does not cover the QRNN block of layer {i} (missing {missing}, wrong shape {wrong}): "
                "the checkpoint is incomplete or from another model"
            )
        block.load_state_dict(got)
    extra = sorted({k.split(".")[1] for k in state} - {str(i) for i in doc["replaced_layers"]})
    if extra:
        raise ModelError(f"{weights} has QRNN weights for layers {extra} that {CONFIG_FILE} does not replace")
    return model.eval(), teacher, doc
