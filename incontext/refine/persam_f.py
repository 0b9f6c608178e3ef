"""PerSAM-F: fit the 2 mask-mixing weights on cached decoder logits.

The official ``persam_f.py`` (ZrrSkywalker/Personalize-SAM @ a7e87245) trains two scalars ``w = (w1,
w2)`` (initialised to 1/3) that mix SAM's three multimask outputs with weights ``(1 - w1 - w2, w1,
w2)``. Each of its 1000 iterations re-runs the frozen decoder under ``no_grad``, so the three
original-resolution logit maps are the same in every iteration (the fixture generator measured max
abs diff = 0) and only ``w`` gets a gradient.

:func:`fit_mask_weights` therefore takes the three maps once and runs the same optimisation on them:
AdamW (lr 1e-3, eps 1e-4, default betas and weight decay 0.01, so the two weights are decayed) with
CosineAnnealingLR(T_max = iterations) stepped every iteration; loss = Dice (on the sigmoid, +1
smoothing in numerator and denominator) + sigmoid focal loss (alpha 0.25, gamma 2, mean over pixels)
of the mixed map against the reference mask. Two further savings, both exact up to float rounding:

- the per-pixel gradient of that loss is written in closed form and evaluated in preallocated
  buffers (autograd would allocate and free a dozen full-image tensors per iteration), and the
  reductions that matter for the result (the weighted sums over pixels) use torch's cascade ``sum``
  like autograd does; a plain matrix-vector product (sequential float32 accumulation) was measured
  to move the final weights by 1e-5 on the ``cat`` fixture, this version by 0;
- pixels are split by label once, so the target-dependent factors become per-group scalars.

:func:`fit_mask_weights_reference` is the official loop (autograd on the official loss functions, a
logits callable invoked every iteration) kept for tests and ``benchmarks/persam_speed.py``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from incontext.errors import InputError

__all__ = [
    "MaskWeightFit",
    "fit_mask_weights",
    "fit_mask_weights_reference",
    "mix_logits",
    "dice_loss",
    "sigmoid_focal_loss",
]

# Official persam_f.py defaults (argparse: --lr 1e-3, --train_epoch 1000; AdamW eps=1e-4 in the
# script; focal alpha 0.25, gamma 2 in calculate_sigmoid_focal_loss).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2


@dataclass
class MaskWeightFit:
    """Result of a PerSAM-F fit.

    Attributes:
        w: (2,) float32 learned ``(w1, w2)``.
        weights: (3,) float32 mixing weights ``(1 - w1 - w2, w1, w2)`` for the multimask outputs
            1..3.
        history: when recorded, per iteration: ``w_used`` (T, 2) weights at the start of the
            iteration, ``lr`` (T,) learning rate used, ``loss``, ``dice``, ``focal`` (T,) float64.
    """

    w: torch.Tensor
    weights: torch.Tensor
    history: dict[str, np.ndarray] = field(default_factory=dict)


def mix_logits(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the three multimask logit maps, in the official op order.

    Args:
        logits: (3, ...) logits of multimask outputs 1..3 (any trailing shape, e.g. (3, 256, 256) or
            (3, H, W)).
        weights: (3,) mixing weights.
    """
    w = weights.reshape((3,) + (1,) * (logits.ndim - 1)).to(logits.dtype)
    return (logits * w).sum(0)


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Official Dice loss: inputs (1, N) logits, targets (1, N) float in {0, 1}; +1 smoothing."""
    p = inputs.sigmoid().flatten(1)
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Official sigmoid focal loss (RetinaNet), mean over pixels: inputs/targets (1, N)."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum()


def _check(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim < 2 or logits.shape[0] != 3:
        raise InputError(
            f"logits: expected (3, H, W) multimask logits, got shape {tuple(logits.shape)}"
        )
    if tuple(target.shape) != tuple(logits.shape[1:]):
        raise InputError(
            f"target: mask shape {tuple(target.shape)} differs from the logits' "
            f"{tuple(logits.shape[1:])}; "
            "both must be at the reference image's original size"
        )
    flat = logits.detach().float().reshape(3, -1)
    return flat, target.reshape(-1).bool().to(flat.device)


def _optimiser(
    iterations: int,
    lr: float,
    eps: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device | str = "cpu",
):
    w = torch.nn.Parameter(torch.ones(2, 1, device=device) / 3)
    opt = torch.optim.AdamW([w], lr=lr, eps=eps, betas=betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    return w, opt, sched


def _mixing(w: torch.Tensor) -> torch.Tensor:
    """(2, 1) -> (3, 1) = (1 - w1 - w2, w1, w2) like ``cat((1 - w.sum(0).unsqueeze(0), w))``."""
    return torch.cat((1 - w.sum(0).unsqueeze(0), w), dim=0)


def _result(w: torch.Tensor, history: dict[str, list]) -> MaskWeightFit:
    w2 = w.detach().reshape(2).cpu().clone()
    weights = _mixing(w.detach()).reshape(3).cpu().clone()
    hist = {k: np.asarray(v) for k, v in history.items()}
    if "w_used" in hist:
        hist["w_used"] = hist["w_used"].astype(np.float32).reshape(-1, 2)
    return MaskWeightFit(w=w2, weights=weights, history=hist)


class _Group:
    """Pixels of one label, preallocated buffers; ``t = sign * z`` = logit of the wrong label."""

    def __init__(self, logits: torch.Tensor, sign: float, alpha: float):
        self.signed = (logits * sign).contiguous()  # (3, n); negation is exact
        n = self.signed.shape[1]
        self.alpha = alpha
        self.buf3 = torch.empty_like(self.signed)
        self.t, self.p, self.q, self.lq, self.g = (
            torch.empty(n, device=logits.device) for _ in range(5)
        )

    def forward(self, weights: torch.Tensor) -> None:
        """t = sign * mixed logit; p = sigmoid(t) (wrong label); q = 1 - p; lq = log q."""
        torch.mul(self.signed, weights, out=self.buf3)
        torch.sum(self.buf3, 0, out=self.t)
        torch.sigmoid(self.t, out=self.p)
        torch.neg(self.t, out=self.q).sigmoid_()
        # -log(sigmoid(-t)) = softplus(t) = the BCE term; torch's softplus/log1p are ~10x slower
        # here.
        torch.log(self.q, out=self.lq)

    def focal_sum(self) -> float:
        """sum(alpha * p^2 * ce) with ce = -log q."""
        return float(-self.alpha * torch.dot(self.p * self.p, self.lq))

    def gradient(self, k_dice: float, a_focal: float) -> torch.Tensor:
        """(3,) sum over pixels of signed logits * dLoss/dt.

        dLoss/dt = p q k_dice + a_focal p^2 (2 q ce + p), ce = -log q (focal with gamma 2).
        """
        g = self.g
        torch.addcmul(self.p, self.q, self.lq, value=-2.0, out=g)  # p + 2 q ce
        g.mul_(self.p).mul_(a_focal)  # a p (2 q ce + p)
        g.add_(self.q, alpha=k_dice)  # + k q
        g.mul_(self.p)  # * p
        torch.mul(self.signed, g, out=self.buf3)
        return self.buf3.sum(1)


def fit_mask_weights(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    iterations: int = 1000,
    lr: float = 1e-3,
    eps: float = 1e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    record: bool = False,
    stop_after: int | None = None,
    threads: int | None = 1,
) -> MaskWeightFit:
    """Fit PerSAM-F's two mask weights on cached logits (the official loop's result, much faster).

    Args:
        logits: (3, H, W) original-resolution logits of SAM's multimask outputs 1..3 for the
            reference image prompted with its own positive point (no hooks), as in the official
            training step.
        target: (H, W) bool reference mask (official: red channel > 0).
        iterations, lr, eps, weight_decay, betas: optimiser settings (official defaults).
        record: keep the per-iteration history (adds one reduction per iteration).
        stop_after: run only the first n iterations of the ``iterations``-long schedule
            (diagnostics, e.g. comparing the start of a long trajectory); None runs them all.
        threads: torch intra-op threads during the fit, restored afterwards
            (``torch.set_num_threads`` is process-wide, so other threads' torch work is affected
            while the fit runs). Each iteration is ~30 element-wise passes; on a shared CPU the
            hand-off between threads at every pass cost 10-30x more than it saved (measured on the
            project's 2-core machine), so the default is 1. None keeps the current setting.

    Returns:
        MaskWeightFit with ``w`` (2,), ``weights`` (3,) and, if recorded, ``history``.
    """
    if iterations < 1:
        raise InputError(f"iterations: expected a positive count, got {iterations}")
    steps = iterations if stop_after is None else min(int(stop_after), iterations)
    with _num_threads(threads), torch.inference_mode(False), torch.no_grad():
        return _fit(logits, target, iterations, steps, lr, eps, weight_decay, betas, record)


@contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None and n != previous:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _fit(logits, target, iterations, steps, lr, eps, weight_decay, betas, record) -> MaskWeightFit:
    flat, y = _check(logits, target)
    n = flat.shape[1]
    n_fg = int(y.sum())
    # Official: alpha_t = alpha for targets 1, 1 - alpha for targets 0; focal mean over all n
    # pixels.
    fg = _Group(flat[:, y], -1.0, FOCAL_ALPHA)
    bg = _Group(flat[:, ~y], 1.0, 1.0 - FOCAL_ALPHA)
    w, opt, sched = _optimiser(iterations, lr, eps, weight_decay, betas, flat.device)
    history: dict[str, list] = (
        {"w_used": [], "lr": [], "loss": [], "dice": [], "focal": []} if record else {}
    )
    for _ in range(steps):
        weights = _mixing(w)
        fg.forward(weights)
        bg.forward(weights)
        # Dice on s = sigmoid(z): s = q on foreground pixels, p on background pixels.
        inter = float(fg.q.sum())
        denom = inter + float(bg.p.sum()) + n_fg + 1.0
        num = 2.0 * inter + 1.0
        k_fg = (2.0 * denom - num) / (denom * denom)
        k_bg = num / (denom * denom)
        grad3 = fg.gradient(k_fg, fg.alpha / n) + bg.gradient(k_bg, bg.alpha / n)
        if record:
            dice = 1.0 - num / denom
            focal = (fg.focal_sum() + bg.focal_sum()) / n
            history["w_used"].append(w.detach().reshape(2).cpu().numpy().copy())
            history["lr"].append(sched.get_last_lr()[0])
            history["dice"].append(dice)
            history["focal"].append(focal)
            history["loss"].append(dice + focal)
        w.grad = (grad3[1:] - grad3[0]).reshape(2, 1)
        opt.step()
        sched.step()
    return _result(w, history)


def fit_mask_weights_reference(
    logits_fn: Callable[[], torch.Tensor],
    target: torch.Tensor,
    *,
    iterations: int = 1000,
    lr: float = 1e-3,
    eps: float = 1e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    record: bool = False,
) -> MaskWeightFit:
    """The official training loop: ``logits_fn()`` (frozen decoder) every iteration + autograd.

    Args:
        logits_fn: returns (3, H, W) original-resolution multimask logits; the official script calls
            ``predictor.predict(...)`` here, under no-grad.
        target, iterations, ...: as :func:`fit_mask_weights`.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_reference(logits_fn, target, iterations, lr, eps, weight_decay, betas, record)


def _fit_reference(
    logits_fn, target, iterations, lr, eps, weight_decay, betas, record
) -> MaskWeightFit:
    gt = target.reshape(1, -1).float().clone()
    w, opt, sched = _optimiser(iterations, lr, eps, weight_decay, betas, gt.device)
    history: dict[str, list] = (
        {"w_used": [], "lr": [], "loss": [], "dice": [], "focal": []} if record else {}
    )
    for _ in range(iterations):
        with torch.no_grad():
            logits = (
                logits_fn().clone()
            )  # a plain tensor (inference tensors can't be saved for backward)
        if record:
            history["w_used"].append(w.detach().reshape(2).cpu().numpy().copy())
            history["lr"].append(sched.get_last_lr()[0])
        z = (logits.flatten(1) * _mixing(w)).sum(0).unsqueeze(0)
        dice = dice_loss(z, gt)
        focal = sigmoid_focal_loss(z, gt)
        loss = dice + focal
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if record:
            history["dice"].append(float(dice.detach()))
            history["focal"].append(float(focal.detach()))
            history["loss"].append(float(loss.detach()))
    return _result(w, history)
