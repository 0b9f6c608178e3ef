"""AdamW with the usual no-decay groups, and a stateless warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import math

import torch

__all__ = ["param_groups", "build_adamw", "lr_at", "set_lr"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of linear/conv layers decay; biases, norms, tokens, position tables don't
    (1-D tensors and any parameter whose name says token / position / rel_pos)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in ("token", "position", "rel_pos", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    # foreach=False keeps the update order fixed across runs and ranks (no fused reductions).
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             foreach=False)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up from base/warmup to base over ``warmup_steps``, then cosine to base·min_lr_ratio at
    ``total_steps``. ``step`` counts optimiser updates from 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
