"""Matcher's patch-feature backbone with an offline default: DINOv2 when its file is found, else an encoder
trained in this project.

:func:`build_default_dinov2` is a drop-in for :func:`incontext.backbones.dinov2.build_dinov2` (same keys, so a
``configs/backbone/dinov2_*.yaml`` node can be merged into it): with a configured path, explicit sizes, ``weights
=random`` or a released checkpoint found locally it returns exactly what ``build_dinov2`` returns. Only when the
config leaves ``weights`` unset and no released DINOv2 file exists locally does it print one line on stderr and
return patch features trained here - never a randomly initialised DINOv2: the shipped ``patch_encoder_tiny``
(:mod:`incontext.features.learned`, trained to match a support's object to its class in a query) when it is
there, else the image encoder of the shipped ``sam_tiny_synthetic`` (:mod:`incontext.backbones.sam_shipped`) on
DINOv2's patch grid (:class:`GridSamFeatures`). When neither folder is shipped, ``build_dinov2``'s own "not
found" error is raised.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from incontext.backbones.dinov2 import build_dinov2
from incontext.backbones.sam_shipped import (
    SHIPPED_NAME,
    SamEncoderFeatures,
    build_shipped_sam,
    shipped_dir,
)
from incontext.backbones.weights import KNOWN_WEIGHTS, find, search_dirs, shipped
from incontext.errors import InputError
from incontext.features.learned import SHIPPED_NAME as LEARNED_NAME
from incontext.features.learned import LearnedPatchFeatures

__all__ = ["GridSamFeatures", "build_default_dinov2"]

_announced: set[str] = set()


class GridSamFeatures:
    """A SAM image encoder's neck tokens resampled (bilinear) to the patch grid of a DINOv2 ViT/14, with the
    interface Matcher reads (``patch_size``, ``normalize``, ``patch_tokens(...)["prenorm"]``).

    Matcher keeps its released geometry (``image_size`` 518 = 37 x 37 patches of 14 px); the SAM encoder sees the
    image at its own input size (e.g. 128 px -> 16 x 16 tokens) and its (C, 16, 16) map is interpolated to
    (C, 37, 37), so each Matcher patch gets the feature at its centre.

    Args:
        sam: a ``BatchedSamPredictor`` (e.g. the shipped ``sam_tiny_synthetic``).
        work_size: Matcher's square working size (its ``image_size``); a multiple of ``patch_size``.
        patch_size: patch side in working pixels (14 = DINOv2 ViT/14).
    """

    def __init__(self, sam: Any, work_size: int = 518, patch_size: int = 14) -> None:
        if int(work_size) % int(patch_size):
            raise InputError(f"GridSamFeatures: work_size={work_size} is not a multiple of patch_size={patch_size}")
        grid = int(sam.model.prompt_encoder.image_embedding_size[0])
        self.encoder = SamEncoderFeatures(sam, work_size=grid)  # normalisation + neck tokens on SAM's own grid
        self.sam_grid = grid
        self.grid = int(work_size) // int(patch_size)
        self.patch_size = int(patch_size)
        self.work_size = int(work_size)
        self.embed_dim = self.encoder.embed_dim
        self.name = f"{self.encoder.name}@{self.grid}x{self.grid}"
        self.model = self.encoder.model

    def to(self, device: str | torch.device) -> GridSamFeatures:
        self.encoder.to(device)
        return self

    def normalize(self, images: Any) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, s, s) float at SAM's input size s (see ``SamEncoderFeatures``)."""
        return self.encoder.normalize(images)

    @torch.inference_mode()
    def patch_tokens(self, x: torch.Tensor, batch_size: int = 8, block: int | None = None) -> dict[str, torch.Tensor]:
        """{"prenorm", "normed"}: (B, grid * grid, C) row-major tokens on the ``work_size / patch_size`` grid."""
        t = self.encoder.patch_tokens(x, batch_size=batch_size, block=block)["prenorm"]
        b, _, c = t.shape
        fmap = t.transpose(1, 2).reshape(b, c, self.sam_grid, self.sam_grid)
        up = F.interpolate(fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        out = up.flatten(2).transpose(1, 2).contiguous()
        return {"prenorm": out, "normed": out}


def build_default_dinov2(
    name: str | None = "dinov2_vitl14",
    *,
    arch: Mapping[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    weights_key: str = "backbone.weights",
    work_size: int = 518,
    fallback: str | None = SHIPPED_NAME,
    **dinov2_kwargs: Any,
) -> Any:
    """``build_dinov2`` with the offline default described in the module docstring.

    Args:
        name, arch, weights, device, weights_key, **dinov2_kwargs: as :func:`build_dinov2`.
        work_size: Matcher's working size the fallback features are laid out for (518 = 37 x 14 px).
        fallback: any true value (default) = the offline fallback of the module docstring; ``None`` to get
            ``build_dinov2``'s error instead.
    """
    wants_fallback = (weights is None and arch is None and fallback and name in KNOWN_WEIGHTS
                      and KNOWN_WEIGHTS[name].family == "dinov2")
    learned = shipped(LEARNED_NAME, search_dirs()) if wants_fallback else None
    if wants_fallback and (learned is not None or shipped_dir() is not None):
        found, looked = find(name)
        if found is None:
            patch = 14  # every released DINOv2 (dinov2_vit{s,b,l,g}14[_reg]) is a ViT/14
            if learned is not None:
                feats = LearnedPatchFeatures(learned, work_size=work_size, patch_size=patch, device=device)
                what = f"the shipped {LEARNED_NAME} (a patch encoder trained here on procedural scenes)"
            else:
                feats = GridSamFeatures(build_shipped_sam(device=device), work_size=work_size, patch_size=patch)
                what = (f"the image encoder of the shipped {SHIPPED_NAME} (trained here on procedural scenes, "
                        f"{feats.sam_grid}x{feats.sam_grid} tokens resampled to {feats.grid}x{feats.grid})")
            if name not in _announced:
                _announced.add(name)
                print(f"incontext: no {name} checkpoint found locally (looked in {len(looked)} places); patch "
                      f"features = {what} - set {weights_key}=<path to the official file> for DINOv2",
                      file=sys.stderr)
            return feats
    return build_dinov2(name, arch=arch, weights=weights, device=device, weights_key=weights_key, **dinov2_kwargs)
