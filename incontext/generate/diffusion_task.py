"""Training the diffusion mask generator with ``train.py``: episode -> model-frame tensors, and the x0 loss.

Per sample:

* k shots (1..``max_shots``, drawn per episode by ``MixedShotEpisodes``) are padded to ``max_shots`` with a
  ``shot_valid`` flag, so k-shot batches stack; padding shots are never encoded;
* images are area-resampled to the model frame (training renders at a larger size than the frame, like
  evaluation, so the model sees resampled rather than aliased textures); the query mask's coverage > 0.5 is the
  target;
* optional horizontal flip of the whole episode (same flip for query and supports).

Loss (in ``loss``): mask x0 in {-s, +s}; t ~ U(0, 1), with probability ``p_pure_noise`` t = 1 (pure noise: the
step the one-step sampler takes; reference note 5.1); x_t = sqrt(ab) x0 + sqrt(1 - ab) eps on the cosine
schedule; self-conditioning with probability ``p_self_cond`` (a gradient-free first prediction is fed back);
condition dropout with probability ``p_uncond`` (null support token, zero prior) so classifier-free guidance is
available; BCE + soft Dice on the predicted x0 logits, per sample, averaged over samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from incontext.episode import Support
from incontext.generate.diffusion import (
    DiffusionMethod,
    build_match_stage,
    load_diffusion,
    mask_to_frame,
    to_frame,
)
from incontext.generate.diffusion_net import DiffusionConfig, DiffusionSegModel
from incontext.generate.diffusion_process import q_sample
from incontext.train.data import TrainItem

__all__ = ["DiffusionTask", "MixedShotEpisodes", "dice_loss"]


class MixedShotEpisodes:
    """Training episodes of the procedural benchmark with a varying number of shots.

    Episode i has k_i shots, k_i drawn from ``shot_probs`` with a generator seeded by (seed, i); its query and
    first supports are those of the benchmark's k_i-shot episode i (the benchmark draws the j-th support from
    its own stream, so only the shots actually used are rendered).

    Args:
        split, size, seed: as ``SyntheticBenchmark`` (``split`` "train" = the 960 training classes).
        max_shots: largest k.
        shot_probs: probabilities of k = 1..max_shots (None = uniform).
    """

    def __init__(self, split: str = "train", size: int = 128, max_shots: int = 3,
                 shot_probs: list[float] | None = None, seed: int = 0) -> None:
        from incontext.data.synthetic import SyntheticBenchmark

        self.max_shots = int(max_shots)
        p = np.ones(self.max_shots) if shot_probs is None else np.asarray(shot_probs, np.float64)
        if len(p) != self.max_shots or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"shot_probs: {shot_probs!r} must be {self.max_shots} non-negative weights")
        self.shot_probs = p / p.sum()
        self.seed = int(seed)
        self.benches = [SyntheticBenchmark(split=split, size=size, shots=k, episodes=1, seed=seed)
                        for k in range(1, self.max_shots + 1)]

    def shots(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, int(index), 7])
        return 1 + int(rng.choice(self.max_shots, p=self.shot_probs))

    def episode(self, index: int) -> Any:
        return self.benches[self.shots(index) - 1].episode(int(index))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss: (B, 1, S, S) logits and 0/1 target -> (B,)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


class DiffusionTask:
    """``TrainTask`` of the diffusion mask generator (see ``incontext.train.task``).

    Args:
        model: ``DiffusionConfig`` keyword arguments (architecture).
        init_checkpoint: optional folder to start from instead of a random init.
        max_shots: supports per sample are padded to this many (must match the data's ``max_shots``).
        signal_scale: mask amplitude s (x0 in {-s, +s}); DiffusionInst uses 2, Analog Bits ~1.
        p_pure_noise: probability of t = 1 (the regression step).
        p_self_cond: probability of self-conditioning a sample.
        p_uncond: probability of dropping the condition (classifier-free guidance training; Prompt Diffusion
            and Ref-LDM-Seg drop 5 % per condition, the reference note suggests 10 %).
        dice_weight: weight of the Dice term beside BCE.
        prior_loss_weight: weight of the auxiliary BCE of the matching prior's affine read-out against the
            query mask's token coverage (conditioned samples only): a direct metric-learning signal for the
            jointly trained encoder (PANet's idea of supervising the matching itself). 0 = off.
        hflip: probability of flipping the whole episode.
        eval_steps: DDIM steps of the periodic evaluation.
    """

    name = "diffusion"

    def __init__(
        self,
        model: dict[str, Any],
        init_checkpoint: str | None = None,
        max_shots: int = 3,
        signal_scale: float = 1.0,
        p_pure_noise: float = 0.5,
        p_self_cond: float = 0.5,
        p_uncond: float = 0.1,
        dice_weight: float = 1.0,
        prior_loss_weight: float = 0.5,
        hflip: float = 0.5,
        eval_steps: int = 1,
    ) -> None:
        self.model_config = dict(model)
        self.init_checkpoint = init_checkpoint
        self.max_shots = int(max_shots)
        self.signal_scale = float(signal_scale)
        self.p_pure_noise = float(p_pure_noise)
        self.p_self_cond = float(p_self_cond)
        self.p_uncond = float(p_uncond)
        self.dice_weight = float(dice_weight)
        self.prior_loss_weight = float(prior_loss_weight)
        self.hflip = float(hflip)
        self.eval_steps = int(eval_steps)
        cfg = DiffusionConfig.from_dict(dict(model))
        self.size, self.grid = cfg.image_size, cfg.grid
        self._matcher = build_match_stage(cfg.match_prior) if cfg.match_prior is not None else None

    # ------------------------------------------------------------------ TrainTask
    def build_model(self) -> torch.nn.Module:
        if self.init_checkpoint is not None:
            return load_diffusion(self.init_checkpoint).train()
        return DiffusionSegModel(DiffusionConfig.from_dict(dict(self.model_config))).train()

    def make_sample(self, item: TrainItem, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Tensors of one episode in the model frame: ``query`` (3, S, S) uint8, ``query_mask`` (1, S, S)
        0/1 float, ``supports`` (K, 3, S, S) uint8, ``support_masks`` (K, S, S) coverage in [0, 1],
        ``shot_valid`` (K,) bool (K = max_shots), the per-sample noise draw ``u`` (4,) uniform and, for models
        with ``match_prior``, ``match`` (1, h, w): the training-free matcher's foreground probability on the
        token grid (computed on the episode's own images, as the match stage does at inference)."""
        s, kmax = self.size, self.max_shots
        sup = item.supports[:kmax]
        if not sup:
            raise ValueError("training item without supports")
        flip = rng.random() < self.hflip

        def img(a: np.ndarray) -> torch.Tensor:
            x = (to_frame(a, s) * 255).round().to(torch.uint8)
            return x.flip(-1) if flip else x

        def msk(m: np.ndarray) -> torch.Tensor:
            x = mask_to_frame(m, s)
            return x.flip(-1) if flip else x

        supports = torch.zeros(kmax, 3, s, s, dtype=torch.uint8)
        masks = torch.zeros(kmax, s, s)
        valid = torch.zeros(kmax, dtype=torch.bool)
        for j, sp in enumerate(sup):
            supports[j], masks[j], valid[j] = img(sp.image), msk(sp.mask > 0), True
        target = (msk(item.query_mask > 0) > 0.5).float()[None]
        out = {"query": img(item.query), "query_mask": target, "supports": supports, "support_masks": masks,
               "shot_valid": valid, "u": torch.from_numpy(rng.random(4).astype(np.float32))}
        if self._matcher is not None:
            binary = [Support.from_arrays(sp.image, (sp.mask > 0).astype(np.uint8)) for sp in sup]
            with torch.no_grad():
                prior = self._matcher.similarity(item.query, self._matcher.prepare(binary), {})
            m = F.adaptive_avg_pool2d(prior.float().cpu()[None, None], (self.grid, self.grid))[0]
            out["match"] = m.flip(-1) if flip else m
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        y = batch["query_mask"].float()
        u = batch["u"]  # per-sample uniforms drawn in make_sample: t, pure-noise, self-cond, dropout
        t = torch.where(u[:, 1] < self.p_pure_noise, torch.ones_like(u[:, 0]), u[:, 0])
        noise = torch.randn_like(y)  # torch's generator: reseeded by the loop per (seed, step, micro, rank)
        x0 = (2 * y - 1) * self.signal_scale
        x_t = q_sample(x0, t, noise)
        drop = u[:, 3] < self.p_uncond
        logits, prior_logits = model(
            batch["query"].float() / 255.0, batch["supports"].float() / 255.0, batch["support_masks"].float(),
            batch["shot_valid"].bool(), x_t, t, drop, u[:, 2] < self.p_self_cond,
            self.signal_scale, batch.get("match"),
        )
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(1).mean(1)
        dice = dice_loss(logits, y)
        per_sample = bce + self.dice_weight * dice
        logs = {"bce": float(bce.detach().mean()), "dice": float(dice.detach().mean())}
        if self.prior_loss_weight > 0:
            cover = F.adaptive_avg_pool2d(y, prior_logits.shape[-2:])
            aux = F.binary_cross_entropy_with_logits(prior_logits, cover, reduction="none").flatten(1).mean(1)
            per_sample = per_sample + self.prior_loss_weight * aux * (~drop).float()
            logs["prior_bce"] = float(aux.detach().mean())
        with torch.no_grad():  # IoU of the one-step (t = 1) predictions: what steps=1 evaluation sees
            pred = logits.detach() > 0
            inter = (pred & (y > 0.5)).flatten(1).sum(1).float()
            union = (pred | (y > 0.5)).flatten(1).sum(1).float().clamp_min(1)
            pure = (t >= 1.0) & ~drop
            logs["iou_t1"] = float((inter / union)[pure].mean()) if bool(pure.any()) else float("nan")
        return per_sample.mean(), logs

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        getattr(model, "module", model).save_pretrained(directory)

    def segmenter(self, model: torch.nn.Module, device: torch.device):
        return DiffusionMethod(model=getattr(model, "module", model), steps=self.eval_steps, device=device)
