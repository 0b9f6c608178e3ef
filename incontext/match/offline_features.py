"""Patch features for Matcher that need no downloaded weights.

Matcher reads its DINOv2 backbone through three members: ``patch_size``, ``normalize(images)`` and
``patch_tokens(x)["prenorm"]`` ((B, N, C) tokens on the row-major patch grid, L2-normalised by Matcher).
:class:`HandcraftedPatchFeatures` gives the project's colour + texture features
(:class:`incontext.features.HandcraftedFeatures`, what ``prototype`` uses) that interface: at the released
working size 518 with 14-pixel cells they form the same 37 x 37 grid as DINOv2 ViT/14, so Matcher's geometry is
unchanged. Channels are standardised with fixed statistics measured once on scenes of the procedural
benchmark's TRAIN split (never on the images being segmented, so supports and queries share one feature space).
The SAM-encoder alternative is :class:`incontext.backbones.sam_shipped.SamEncoderFeatures`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from incontext.errors import InputError
from incontext.features.handcrafted import HandcraftedFeatures

__all__ = ["HandcraftedPatchFeatures"]


class HandcraftedPatchFeatures:
    """Matcher-compatible handcrafted patch features.

    Args:
        work_size: Matcher's square working size (its ``image_size``); must be a multiple of ``patch_size``.
        patch_size: cell side in working pixels (14 gives DINOv2's 37 x 37 grid at 518).
        stats_scenes: train-split scenes used to fit the per-channel mean and std (at ``work_size``).
        seed: seed of those scenes.
        device: where tokens are returned.
    """

    def __init__(self, work_size: int = 518, patch_size: int = 14, stats_scenes: int = 16, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if int(work_size) % int(patch_size):
            raise InputError(f"HandcraftedPatchFeatures: work_size={work_size} is not a multiple of "
                             f"patch_size={patch_size}")
        self.patch_size = int(patch_size)
        self.work_size = int(work_size)
        self.grid = self.work_size // self.patch_size
        self.extractor = HandcraftedFeatures(size=self.work_size, stride=self.patch_size)
        self.embed_dim = self.extractor.dim
        self.name = f"handcrafted_patches(size={self.work_size},patch={self.patch_size})"
        self.device = torch.device(device)
        self.mean, self.std = self._fit_stats(int(stats_scenes), int(seed))
        self.model = torch.nn.Identity()  # Matcher walks backbone modules to set attention flags

    def _fit_stats(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from incontext.data.base import episode_rng, split_key
        from incontext.data.synthetic import SceneRenderer

        r = SceneRenderer("train", self.work_size)
        feats = []
        for i in range(max(1, n)):
            rng = episode_rng(seed, split_key("handcrafted_stats/train"), i)
            sc = r.scene(rng, [r.classes[int(rng.integers(len(r.classes)))].id])
            feats.append(self._raw(sc.image).reshape(self.embed_dim, -1))
        f = torch.cat(feats, 1)
        return f.mean(1), f.std(1).clamp_min(1e-6)

    def _raw(self, image: np.ndarray) -> torch.Tensor:
        f = self.extractor(image).float()  # (C, h, w)
        if tuple(f.shape[-2:]) != (self.grid, self.grid):
            f = torch.nn.functional.adaptive_avg_pool2d(f[None], self.grid)[0]
        return f

    def to(self, device: str | torch.device) -> "HandcraftedPatchFeatures":
        self.device = torch.device(device)
        return self

    def normalize(self, images: Any) -> np.ndarray:
        """(B, S, S, 3) uint8 -> the same array (filtering happens in ``patch_tokens``)."""
        a = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise InputError(f"HandcraftedPatchFeatures.normalize: images {a.shape} {a.dtype}; expected "
                             "(B, S, S, 3) uint8")
        return a

    def patch_tokens(self, x: np.ndarray, batch_size: int = 8, block: int | None = None) -> dict[str, torch.Tensor]:
        """{"prenorm", "normed"}: (B, grid * grid, C) standardised tokens, row-major."""
        if block is not None:
            raise InputError("HandcraftedPatchFeatures.patch_tokens: block must be None")
        toks = []
        for img in x:
            f = (self._raw(img) - self.mean[:, None, None]) / self.std[:, None, None]
            toks.append(f.flatten(1).T)
        t = torch.stack(toks).to(self.device)
        return {"prenorm": t, "normed": t}


def build_handcrafted_patch_features(work_size: int = 518, patch_size: int = 14, stats_scenes: int = 16,
                                     seed: int = 0, device: str | torch.device = "cpu",
                                     weights_key: str | None = None) -> HandcraftedPatchFeatures:
    """Config entry point of ``configs/backbone/handcrafted_patches.yaml`` (``weights_key`` accepted for
    drop-in use in a DINOv2 slot; there are no weights)."""
    return HandcraftedPatchFeatures(work_size, patch_size, stats_scenes, seed, device)
