"""SAGE: sensitivity-guided adaptive learning rate (Liang et al., "No Parameters Left Behind: Sensitivity
Guided Adaptive Learning Rate for Training Large Transformer Models", ICLR 2022).

SAGE scales Adam's step for every weight by the ratio of the local temporal variation of its sensitivity
to the sensitivity itself, so that under-trained (low-sensitivity) weights learn faster and well-trained
(high-sensitivity) ones slower. Per weight ``j`` at step ``t``::

    I_j   = |θ_j · g_j|                                     sensitivity
    Ī_j   ← β3 Ī_j + (1 - β3) I_j                           smoothed sensitivity
    Û_j   ← β3 Û_j + (1 - β3) |I_j - Ī_j|                   local temporal variation
    m, v  ← Adam's first and second moments of g
    θ_j   ← θ_j - lr · (Û_j + ε) / (Ī_j + ε) · m̂_j / (√v̂_j + ε_adam) - lr · wd · θ_j

The ratio is clipped to ``[0, max_ratio]`` for stability in the first steps, where Ī is still tiny.
"""

from __future__ import annotations

import torch


class Sage(torch.optim.Optimizer):
    """AdamW with SAGE's per-weight learning-rate scale (see module docstring).

    Args:
        params: parameters or parameter groups.
        lr: base learning rate.
        betas: Adam's (β1, β2).
        beta3: EMA factor of the sensitivity and its variation (paper: 0.6-0.9; default 0.75).
        eps: Adam's epsilon.
        sage_eps: ε of the ratio (Û + ε) / (Ī + ε).
        weight_decay: decoupled weight decay (AdamW).
        max_ratio: upper clip of the SAGE ratio.
    """

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.75,
        eps: float = 1e-8,
        sage_eps: float = 1e-12,
        weight_decay: float = 0.01,
        max_ratio: float = 10.0,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, not {lr}")
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, sage_eps=sage_eps, weight_decay=weight_decay, max_ratio=max_ratio
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            b3 = group["beta3"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    state["ibar"] = torch.zeros_like(p)
                    state["ubar"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                sens = (p * g).abs()
                state["ibar"].mul_(b3).add_(sens, alpha=1 - b3)
                state["ubar"].mul_(b3).add_((sens - state["ibar"]).abs(), alpha=1 - b3)
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["m"] / (1 - b1**t)
                v_hat = state["v"] / (1 - b2**t)
                ratio = ((state["ubar"] + group["sage_eps"]) / (state["ibar"] + group["sage_eps"])).clamp_(
                    0, group["max_ratio"]
                )
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(-group["lr"] * ratio * m_hat / (v_hat.sqrt() + group["eps"]))
        return loss


def make_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """``"adamw"`` (torch.optim.AdamW) or ``"sage"`` (:class:`Sage`) over ``model``'s trainable parameters;
    biases and LayerNorm weights get no weight decay. Raises ValueError for another name."""
    decay, no_decay = [], []
    for name_, p in model.named_parameters():  # each shared parameter once (remove_duplicate=True)
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name_ else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sage":
        return Sage(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use adamw or sage")


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float = 0.06):
    """Linear warm-up over ``warmup_frac`` of the steps, then linear decay to 0 (BERT fine-tuning's schedule)."""
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
