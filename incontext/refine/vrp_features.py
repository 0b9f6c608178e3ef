"""Frozen feature backbones of the VRP-SAM head: (mid-level, high-level) feature maps of square images.

Both take (B, 3, S, S) float RGB in 0..255 at their ``image_size`` and return ``VrpFeatureMaps``.

* :class:`SamEncoderVrpFeatures` (offline default): the frozen SAM's own image encoder, i.e. an encoder trained
  in this project (``sam_tiny_synthetic``), so one encoder pass per image serves both the head and SAM's mask
  decoder. Mid-level = the outputs of the ViT blocks ``mid_blocks`` (concatenated), high-level = the neck output
  (the SAM image embedding). Deviation from the released ResNet path: the support is masked *after* the encoder
  (a ViT has no cheap "last stage" to feed a masked input to).
* :class:`ResNetVrpFeatures` (the paper's backbone): ResNet-50 with dilated layer3/layer4 (output stride 8),
  mid-level = layer2 + layer3 (1536 ch), high-level = layer4 of the support's layer3 features times its mask
  (PFENet style, as the released code). torchvision's ResNet-50 layout (standard stem), loaded strictly from a
  local torchvision-format file: the released ``resnet50_v2.pth`` (deep PSPNet stem) has other keys and is
  refused rather than loaded partially.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from incontext.errors import InputError, WeightsNotFoundError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResNetVrpFeatures",
    "SamEncoderVrpFeatures",
    "VrpFeatureMaps",
    "build_vrp_features",
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class VrpFeatureMaps:
    """mid: (B, Cm, h, w); high: (B, Ch, h', w'); sam_embedding: (B, C, g, g) when the backbone is SAM's own
    encoder (so the decoder reuses it), else None."""

    mid: torch.Tensor
    high: torch.Tensor
    sam_embedding: torch.Tensor | None = None


class SamEncoderVrpFeatures:
    """A frozen SAM image encoder as the VRP backbone (see the module docstring).

    Args:
        sam: a ``segment_anything`` ``Sam`` (its pixel statistics normalise the input).
        mid_blocks: 0-based ViT block indexes whose outputs form the mid-level features.
        prior: features of the cosine prior ("high"): "neck" = the SAM image embedding (the released code's
            analogue, its last stage) or "mid" = the mid-level features themselves. On ``sam_tiny_synthetic``
            the neck is tuned for the mask decoder and matches classes poorly (test episodes, 16 x 16 grid: AUC
            0.78 of the max-cosine prior vs 0.90 for the block outputs; its maximum lands on the target in 33 %
            vs 68 % of episodes).
    """

    kind = "sam_encoder"
    PRIORS = ("neck", "mid")

    def __init__(self, sam: nn.Module, mid_blocks: Sequence[int] = (1, 3), prior: str = "neck") -> None:
        enc = sam.image_encoder
        depth = len(enc.blocks)
        self.mid_blocks = tuple(int(i) for i in mid_blocks)
        if not self.mid_blocks or any(not 0 <= i < depth for i in self.mid_blocks):
            raise InputError(f"VRP features: mid_blocks={list(mid_blocks)}; pick indexes in 0..{depth - 1}")
        if prior not in self.PRIORS:
            raise InputError(f"VRP features: prior={prior!r}; pass one of {', '.join(self.PRIORS)}")
        self.sam = sam
        self.prior = prior
        self.image_size = int(enc.img_size)
        width = int(enc.patch_embed.proj.out_channels)
        self.mid_channels = width * len(self.mid_blocks)
        self.high_channels = self.mid_channels if prior == "mid" else int(sam.prompt_encoder.embed_dim)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "mid_blocks": list(self.mid_blocks), "prior": self.prior}

    def __call__(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> VrpFeatureMaps:
        """``mask`` is accepted for the common interface; the head masks the high-level support features."""
        enc = self.sam.image_encoder
        x = (images - self.sam.pixel_mean) / self.sam.pixel_std
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        mids = []
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if i in self.mid_blocks:
                mids.append(x.permute(0, 3, 1, 2))
        emb = enc.neck(x.permute(0, 3, 1, 2))
        mid = torch.cat(mids, 1)
        return VrpFeatureMaps(mid=mid, high=mid if self.prior == "mid" else emb, sam_embedding=emb)

    def to(self, device: str | torch.device) -> SamEncoderVrpFeatures:
        return self  # the SAM is moved by its owner


class ResNetVrpFeatures:
    """Frozen dilated ResNet-50 (output stride 8) as the released VRP-SAM uses it (see the module docstring).

    Args:
        weights: a torchvision-format ResNet-50 state dict (.pth read with weights_only, or .safetensors);
            ``"random"`` for a seeded random init (tests).
        image_size: square input side (released: 512).
        weights_key: the config key named in errors.
    """

    kind = "resnet50"
    mid_channels = 512 + 1024
    high_channels = 2048

    def __init__(self, weights: str | os.PathLike | None, image_size: int = 512, seed: int = 0,
                 weights_key: str = "method.features_weights") -> None:
        from torchvision.models import resnet50

        from incontext.backbones.checkpoint import check_keys, read_state_dict

        if weights is None:
            raise WeightsNotFoundError(
                f"VRP ResNet-50 backbone: no weights given; set {weights_key}=<torchvision-format resnet50 .pth or "
                ".safetensors> (e.g. torchvision's resnet50-11ad3fa6.pth, copied locally; no download happens) "
                "or use the offline default features (the SAM encoder, features: sam_encoder)")
        torch.manual_seed(seed)
        net = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        if str(weights) != "random":
            p = Path(weights).expanduser()
            if not p.is_file():
                raise WeightsNotFoundError(f"VRP ResNet-50 backbone: {str(p)!r} does not exist; set {weights_key} "
                                           "to a local torchvision-format resnet50 checkpoint")
            sd = read_state_dict(p, name="VRP ResNet-50 weights")
            check_keys(sd, net.state_dict().keys(), name="VRP ResNet-50 weights", path=p, ignore=("fc.",))
            net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=False)
        net.fc = nn.Identity()
        self.net = net.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.weights = str(weights)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size}

    def to(self, device: str | torch.device) -> ResNetVrpFeatures:
        self.net.to(device)
        return self

    def __call__(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> VrpFeatureMaps:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        n = self.net
        x = (images - mean) / std
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        f2 = n.layer2(n.layer1(x))
        f3 = n.layer3(f2)
        x4 = f3
        if mask is not None:  # PFENet / VRP-SAM: the support is masked before the last stage
            x4 = f3 * F.interpolate(mask.float(), f3.shape[-2:], mode="bilinear", align_corners=True)
        return VrpFeatureMaps(mid=torch.cat([f2, f3], 1), high=n.layer4(x4))


def build_vrp_features(spec: Mapping[str, Any], sam: nn.Module, weights: str | os.PathLike | None = None,
                       weights_key: str = "method.features_weights"):
    """The feature backbone a head was trained with, from its config.json ``features`` entry."""
    kind = spec.get("kind")
    if kind == SamEncoderVrpFeatures.kind:
        return SamEncoderVrpFeatures(sam, spec.get("mid_blocks", (1, 3)), spec.get("prior", "neck"))
    if kind == ResNetVrpFeatures.kind:
        return ResNetVrpFeatures(weights, image_size=int(spec.get("image_size", 512)), weights_key=weights_key)
    raise InputError(f"VRP features: unknown kind {kind!r}; use 'sam_encoder' or 'resnet50'")
