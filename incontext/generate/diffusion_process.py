"""The diffusion process of the mask generator: continuous-time cosine schedule, forward noising, and the
deterministic DDIM sampler on x0 predictions.

Schedule: alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008, t in [0, 1] (Nichol & Dhariwal 2021,
"Improved DDPM", eq. 17). Training draws continuous t; sampling uses diffusers' ``DDIMScheduler`` with
``beta_schedule="squaredcos_cap_v2"`` — the 1000-step discretisation of the *same* function — because it
already does what a few-step sampler needs: "trailing" timestep spacing (the first step starts from pure noise,
t = 1, so one step is exactly the regression output), the x0 -> epsilon conversion (``prediction_type="sample"``),
eta = 0 determinism and ``set_alpha_to_one`` for the last step. The denoiser is told the continuous t whose
alpha_bar equals the scheduler's discrete alphas_cumprod, so training and sampling agree on the noise level.
Forward noising (one line) is written here because ``add_noise`` takes integer timesteps only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["COSINE_S", "alpha_bar", "t_from_alpha_bar", "q_sample", "make_scheduler", "ddim_sample",
           "TRAIN_TIMESTEPS"]

COSINE_S = 0.008  # Improved DDPM's offset (also diffusers' squaredcos_cap_v2)
TRAIN_TIMESTEPS = 1000  # discretisation of the scheduler used for sampling


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Signal fraction alpha_bar(t) of the cosine schedule, t in [0, 1] -> (0, 1]."""
    return torch.cos((t.float() + COSINE_S) / (1 + COSINE_S) * math.pi / 2).pow(2).clamp(0.0, 1.0)


def t_from_alpha_bar(ab: torch.Tensor) -> torch.Tensor:
    """Inverse of ``alpha_bar`` (clamped to [0, 1])."""
    angle = torch.arccos(ab.float().clamp(0.0, 1.0).sqrt())
    return (angle * 2 / math.pi * (1 + COSINE_S) - COSINE_S).clamp(0.0, 1.0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar(t)) x0 + sqrt(1 - alpha_bar(t)) noise; x0, noise (B, ...), t (B,)."""
    ab = alpha_bar(t).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def make_scheduler():
    """diffusers' ``DDIMScheduler`` configured for x0 prediction on the cosine schedule (see module docstring)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | None = None,
    signal_scale: float = 1.0,
    self_condition: bool = True,
    scheduler=None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise with an x0-predicting denoiser.

    Args:
        denoise: ``f(x_t, t, self_cond) -> x0 logits``; x_t and self_cond (N, 1, S, S) in signal units
            (mask = +-signal_scale), t (N,) continuous in [0, 1].
        shape: (N, 1, S, S): N independent samples (an ensemble when N > 1).
        steps: number of denoiser calls; 1 = one x0 prediction from pure noise (plain regression).
        generator: seeds the initial noise (the only randomness).
        signal_scale: mask amplitude in signal units.
        self_condition: feed each step's x0 estimate back to the next call (Analog Bits); zeros otherwise.
        scheduler: a ``make_scheduler()`` instance to reuse (its timesteps are reset here).

    Returns:
        (N, 1, S, S) x0 logits of the last step.
    """
    if int(steps) < 1:
        raise ValueError(f"steps: {steps}; pass 1 or more")
    sched = scheduler if scheduler is not None else make_scheduler()
    sched.set_timesteps(int(steps), device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    sc = torch.zeros_like(x)
    logits = None
    for step in sched.timesteps:
        ab = sched.alphas_cumprod[int(step)]
        t = t_from_alpha_bar(ab.reshape(1)).expand(shape[0]).to(device)
        logits = denoise(x, t, sc)
        x0 = (2 * torch.sigmoid(logits) - 1) * signal_scale
        if self_condition:
            sc = x0
        x = sched.step(x0, step, x, eta=0.0).prev_sample
    return logits
