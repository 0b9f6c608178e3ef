"""DINOv2 vision transformers and a patch-feature API.

One architecture, four ways to build it, same outputs for the same weights (tested on tiny weights):

* ``source="incontext"`` (default for tiny/random models): :class:`DinoV2ViT`, a subclass of timm's
  ``VisionTransformer`` whose state-dict keys are exactly the official ones (``cls_token``, ``pos_embed``,
  ``mask_token``, ``register_tokens``, ``patch_embed.proj.*``, ``blocks.i.*``, ``norm.*``) and whose position
  embedding interpolation is the official one (bicubic, scale factor with offset 0.1, no antialias), so
  official checkpoints load with ``strict=True`` and any input size multiple of 14 matches official code.
* ``source="hub"``: ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14", ...)``. Offline (the
  default) it loads from a local clone (``hub_repo`` or the torch hub cache ``$TORCH_HOME/hub/
  facebookresearch_dinov2_main``) with ``source="local"`` and never touches the network.
* ``source="timm"``: plain ``timm.create_model("vit_large_patch14_dinov2", ...)`` with the official weights
  converted to timm's layout. timm resamples position embeddings differently off the native size, so use it
  at ``img_size`` only (the wrapper checks this).
* ``source="transformers"``: ``Dinov2Model`` built from a config (weights converted) or ``from_pretrained`` of
  a local Hugging Face folder. Same native-size caveat as timm.

:class:`DinoFeatures` wraps any of them: ``patch_tokens(x)`` returns the chosen block's tokens before and
after the final LayerNorm plus the CLS token (Matcher uses the last block *before* the norm, i.e. official
``forward_features(x)["x_prenorm"][:, 1 + registers:]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from incontext.backbones.checkpoint import check_keys, model_id, read_state_dict, sha256_file
from incontext.backbones.weights import default_hub_repo, weights_path
from incontext.errors import InputError, WeightsNotFoundError

__all__ = [
    "DinoV2Arch",
    "DINOV2_ARCHS",
    "DinoV2ViT",
    "DinoFeatures",
    "build_dinov2",
    "from_arch_json",
    "official_to_timm",
    "official_to_transformers",
    "transformers_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoV2Arch:
    """Constructor arguments of the official ``DinoVisionTransformer`` (hub defaults).

    Defaults are those of ``dinov2/hub/backbones.py::_make_dinov2_model`` (img 518, patch 14, layer-scale
    1.0, MLP FFN, no registers, interpolation offset 0.1, no antialias); LayerNorm eps 1e-6 is fixed in the
    official class. ``ffn_layer`` is ``"mlp"`` or ``"swiglufused"`` (ViT-g).
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518
    in_chans: int = 3
    init_values: float | None = 1.0
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layer_norm_eps: float = 1e-6
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise InputError(
                f"DINOv2 arch: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        if self.img_size % self.patch_size:
            raise InputError(
                f"DINOv2 arch: img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.ffn_layer not in ("mlp", "swiglufused", "swiglu"):
            raise InputError(f"DINOv2 arch: ffn_layer={self.ffn_layer!r}; use 'mlp' or 'swiglufused'")

    @property
    def grid(self) -> int:
        """Side of the native token grid (37 for 518/14)."""
        return self.img_size // self.patch_size

    @property
    def swiglu_hidden(self) -> int:
        """Hidden width of the official fused SwiGLU FFN (ViT-g: 4096)."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8


# Sizes of the official factory functions vit_small/base/large/giant2 in
# facebookresearch/dinov2 dinov2/models/vision_transformer.py; ViT-g uses the fused SwiGLU FFN
# (dinov2/hub/backbones.py::dinov2_vitg14 passes ffn_layer="swiglufused").
DINOV2_ARCHS: dict[str, DinoV2Arch] = {
    "vits14": DinoV2Arch(embed_dim=384, depth=12, num_heads=6),
    "vitb14": DinoV2Arch(embed_dim=768, depth=12, num_heads=12),
    "vitl14": DinoV2Arch(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": DinoV2Arch(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}
_TIMM_NAMES = {
    "vits14": "vit_small_patch14_dinov2",
    "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2",
    "vitg14": "vit_giant_patch14_dinov2",
}


def parse_name(name: str) -> tuple[str, int]:
    """``"dinov2_vitl14_reg"`` -> ``("vitl14", 4)``; raises ``InputError`` listing the known names."""
    base = name[len("dinov2_"):] if name.startswith("dinov2_") else name
    regs = 0
    for suffix in ("_reg4", "_reg"):
        if base.endswith(suffix):
            base, regs = base[: -len(suffix)], 4
            break
    if base not in DINOV2_ARCHS:
        known = [f"dinov2_{k}{r}" for k in DINOV2_ARCHS for r in ("", "_reg")]
        raise InputError(f"DINOv2 name {name!r} is unknown; use one of {known} or pass arch sizes explicitly")
    return base, regs


# --------------------------------------------------------------------------------------------------
# The in-package model: timm VisionTransformer with official keys and official pos-embed interpolation
# --------------------------------------------------------------------------------------------------


class DinoV2ViT(VisionTransformer):
    """DINOv2 ViT with the official state-dict layout and position-embedding interpolation.

    Built on timm's ``VisionTransformer`` (blocks, attention, layer scale, patch embedding), plus the two
    parameters timm does not keep (``mask_token`` (1, C), ``register_tokens`` (1, R, C)). Input: (B, 3, H, W)
    normalised, H and W multiples of the patch size. Token order: CLS, R registers, then H/14 x W/14 patch
    tokens row-major, as in the official code (registers get no position embedding).
    """

    def __init__(self, arch: DinoV2Arch):
        mlp_kwargs: dict[str, Any] = {}
        if arch.ffn_layer in ("swiglufused", "swiglu"):
            # Official fused SwiGLU: w12 (2*hidden x C) then w3; timm's packed SwiGLU has the same layout as
            # fc1/fc2, so only the hidden width (2*hidden packed) has to match.
            mlp_kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
            mlp_ratio = 2 * arch.swiglu_hidden / arch.embed_dim
        else:
            mlp_ratio = arch.mlp_ratio
        super().__init__(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            in_chans=arch.in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=arch.qkv_bias,
            proj_bias=arch.proj_bias,
            init_values=arch.init_values if arch.init_values else None,
            class_token=True,
            no_embed_class=False,
            reg_tokens=0,  # registers are our own parameter (official name and placement)
            dynamic_img_size=True,
            norm_layer=partial(nn.LayerNorm, eps=arch.layer_norm_eps),
            **mlp_kwargs,
        )
        if not arch.ffn_bias:
            for blk in self.blocks:
                blk.mlp.fc1.bias = None
                blk.mlp.fc2.bias = None
        self.arch = arch
        self.mask_token = nn.Parameter(torch.zeros(1, arch.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, arch.num_register_tokens, arch.embed_dim))
            if arch.num_register_tokens
            else None
        )
        self.num_prefix_tokens = 1 + arch.num_register_tokens
        if arch.ffn_layer != "mlp":
            # official ViT-g names its fused SwiGLU weights mlp.w12 / mlp.w3; keep those names in our state dict
            self.register_state_dict_post_hook(_swiglu_to_official)
            self.register_load_state_dict_pre_hook(_swiglu_from_official)

    def interpolate_pos_encoding(self, h0: int, w0: int) -> torch.Tensor:
        """Position embedding (1, 1 + h0*w0, C) for an h0 x w0 patch grid, as official DINOv2 computes it."""
        n = self.pos_embed.shape[1] - 1
        m = int(math.sqrt(n))
        if h0 * w0 == n and h0 == w0:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        if self.arch.interpolate_offset:
            # official kludge kept for bit-compatibility: scale factors instead of an output size
            kwargs: dict[str, Any] = {
                "scale_factor": (
                    float(h0 + self.arch.interpolate_offset) / m,
                    float(w0 + self.arch.interpolate_offset) / m,
                )
            }
        else:
            kwargs = {"size": (h0, w0)}
        patch_pos = F.interpolate(
            patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.arch.interpolate_antialias,
            **kwargs,
        )
        assert patch_pos.shape[-2:] == (h0, w0), (patch_pos.shape, h0, w0)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, h0, w0, C) patch embeddings (dynamic_img_size gives NHWC)
        b, h0, w0, c = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x.reshape(b, h0 * w0, c)), dim=1)
        x = x + self.interpolate_pos_encoding(h0, w0).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return self.pos_drop(x)

    def tokens(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """All tokens (B, 1 + R + h0*w0, C) after block ``block`` (negative counts from the end), pre-norm."""
        idx = block % len(self.blocks)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == idx:
                break
        return x


def _swiglu_to_official(module, state_dict, prefix, local_metadata) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and (".mlp.fc1." in k or ".mlp.fc2." in k)]:
        state_dict[k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")] = state_dict.pop(k)


def _swiglu_from_official(module, state_dict, prefix, *args) -> None:
    for k in [k for k in state_dict if k.startswith(prefix) and (".mlp.w12." in k or ".mlp.w3." in k)]:
        state_dict[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = state_dict.pop(k)


# --------------------------------------------------------------------------------------------------
# Key conversion to the other implementations
# --------------------------------------------------------------------------------------------------


def official_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 state dict -> timm ``vit_*_patch14[_reg4]_dinov2`` layout.

    Drops ``mask_token``; fused SwiGLU ``mlp.w12``/``mlp.w3`` become ``mlp.fc1``/``mlp.fc2``. With registers,
    timm uses ``no_embed_class`` (no position slot for the CLS token), so the CLS position embedding is folded
    into ``cls_token`` (exact: the official code never interpolates that slot) and renamed ``reg_token``.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def official_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 state dict -> transformers 5.x ``Dinov2Model`` names (MLP FFN, no registers).

    ``attn.qkv`` is split into ``q_proj/k_proj/v_proj``; transformers 4.x used other attention names, so
    this is only for transformers >= 5 (checked at conversion time against the model's keys).
    """
    if "register_tokens" in sd:
        raise InputError("transformers backend: DINOv2 with registers is not supported; use source='incontext'")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("cls_token", "mask_token"):
            out[f"embeddings.{k}"] = v.reshape(1, -1) if k == "mask_token" else v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out["layernorm." + k.split(".")[-1]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.split(".")[-1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{pre}attention.{name}.{kind}"] = part
            elif rest.startswith("attn.proj."):
                out[f"{pre}attention.o_proj.{rest.split('.')[-1]}"] = v
            elif rest == "ls1.gamma":
                out[pre + "layer_scale1.lambda1"] = v
            elif rest == "ls2.gamma":
                out[pre + "layer_scale2.lambda1"] = v
            elif rest.startswith("mlp.w12.") or rest.startswith("mlp.w3."):
                raise InputError("transformers backend: SwiGLU (ViT-g) conversion is not supported")
            else:
                out[pre + rest] = v
        else:
            raise InputError(f"transformers backend: unexpected DINOv2 key {k!r}")
    return out


def transformers_config(arch: DinoV2Arch):
    """``transformers.Dinov2Config`` equal to ``arch`` (MLP FFN, no registers)."""
    from transformers import Dinov2Config

    if arch.num_register_tokens or arch.ffn_layer != "mlp" or arch.mlp_ratio != int(arch.mlp_ratio):
        raise InputError("transformers backend supports MLP-FFN DINOv2 with an integer mlp_ratio, no registers")
    return Dinov2Config(
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        mlp_ratio=int(arch.mlp_ratio),  # transformers 5 validates it as an int
        patch_size=arch.patch_size,
        image_size=arch.img_size,
        num_channels=arch.in_chans,
        layerscale_value=arch.init_values or 1.0,
        layer_norm_eps=arch.layer_norm_eps,
        qkv_bias=arch.qkv_bias,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


# --------------------------------------------------------------------------------------------------
# Feature wrapper
# --------------------------------------------------------------------------------------------------


class DinoFeatures(nn.Module):
    """Patch-feature extractor over a DINOv2 model of any supported source.

    Args:
        model: the network (``DinoV2ViT``, an official hub model, a timm or a transformers model).
        backend: ``"incontext" | "hub" | "timm" | "transformers"`` (how to run ``model``).
        arch: its architecture (patch size, registers, native size).
        name: backbone id used in cache keys, e.g. ``"dinov2_vitl14"`` or ``"dinov2_tiny@seed0"``.
    """

    def __init__(self, model: nn.Module, *, backend: str, arch: DinoV2Arch, name: str):
        super().__init__()
        if backend not in ("incontext", "hub", "timm", "transformers"):
            raise InputError(f"DinoFeatures: backend={backend!r}; use incontext, hub, timm or transformers")
        self.model = model.eval()
        self.backend = backend
        self.arch = arch
        self.name = name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def device(self) -> torch.device:
        return self.mean.device

    # ---- preprocessing -------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray | list[np.ndarray], size: int | tuple[int, int] = 518) -> torch.Tensor:
        """uint8 RGB image(s) -> normalised (B, 3, H, W) float tensor on the model's device.

        ``images``: one (H, W, 3) uint8 array or a list of them (any sizes). Each is resized with PIL
        bilinear (antialiased) to ``size`` = (H, W) or a square side, as torchvision ``Resize`` does on a PIL
        image (Matcher: 518 x 518), then ``ToTensor`` and ImageNet normalisation. Sides must be multiples of
        the patch size.
        """
        from PIL import Image

        hw = (size, size) if isinstance(size, int) else tuple(size)
        self._check_size(hw)
        arrs = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        out = []
        for i, a in enumerate(arrs):
            a = np.asarray(a)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise InputError(
                    f"DinoFeatures.preprocess: image {i} is {a.dtype} {a.shape}; expected (H, W, 3) uint8 RGB"
                )
            if a.shape[:2] != hw:
                a = np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.BILINEAR))
            out.append(a)
        return self.normalize(np.stack(out))

    def normalize(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, ``/255`` then ImageNet mean/std (no resize)."""
        t = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
            raise InputError(f"DinoFeatures.normalize: got {t.dtype} {tuple(t.shape)}; expected (B, H, W, 3) uint8")
        x = t.to(self.device).permute(0, 3, 1, 2).float().div(255.0)
        return (x - self.mean) / self.std

    def _check_size(self, hw: tuple[int, ...]) -> None:
        p = self.arch.patch_size
        if len(hw) != 2 or hw[0] % p or hw[1] % p or min(hw) <= 0:
            raise InputError(f"DINOv2 input size {hw} is not a pair of positive multiples of {p}; use e.g. 518")
        if self.backend in ("timm", "transformers") and tuple(hw) != (self.arch.img_size,) * 2:
            raise InputError(
                f"DINOv2 backend {self.backend!r} interpolates position embeddings differently from the official "
                f"code; use input size {self.arch.img_size} or source='incontext'/'hub' for size {hw}"
            )

    # ---- features ------------------------------------------------------------------------------
    @torch.inference_mode()
    def patch_tokens(self, x: torch.Tensor, block: int = -1, batch_size: int = 8) -> dict[str, torch.Tensor]:
        """Tokens of block ``block`` for a normalised batch ``x`` (B, 3, H, W), H, W multiples of 14.

        Returns ``prenorm`` (B, N, C) patch tokens after the block and before the final LayerNorm (official
        ``x_prenorm`` for the last block), ``normed`` (B, N, C) the same after the final LayerNorm,
        ``cls`` (B, C) and ``cls_normed`` (B, C); N = (H/14)*(W/14) row-major; registers are dropped. Runs in
        chunks of ``batch_size`` images.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"DinoFeatures.patch_tokens: x has shape {tuple(x.shape)}; expected (B, 3, H, W)")
        self._check_size(tuple(x.shape[-2:]))
        depth = self.arch.depth
        if not -depth <= block < depth:
            raise InputError(f"DinoFeatures.patch_tokens: block={block} out of range for depth {depth}")
        parts = [self._tokens(x[i : i + batch_size].to(self.device), block) for i in range(0, len(x), batch_size)]
        allt = torch.cat(parts) if len(parts) > 1 else parts[0]
        normed = self._final_norm(allt)
        r = 1 + self.arch.num_register_tokens
        return {
            "prenorm": allt[:, r:],
            "normed": normed[:, r:],
            "cls": allt[:, 0],
            "cls_normed": normed[:, 0],
        }

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Token grid (h0, w0) for input ``x`` (B, 3, H, W)."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def _tokens(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """All tokens (CLS, registers, patches) after ``block``, before the final norm."""
        m = self.model
        if self.backend == "incontext":
            return m.tokens(x, block)
        if self.backend == "hub":
            if block in (-1, self.arch.depth - 1):
                return m.forward_features(x)["x_prenorm"]
            # official get_intermediate_layers strips prefix tokens; run the blocks ourselves instead
            t = m.prepare_tokens_with_masks(x)
            for blk in m.blocks[: block % self.arch.depth + 1]:
                t = blk(t)
            return t
        if self.backend == "timm":
            feats = m.forward_intermediates(
                x,
                indices=[block % self.arch.depth],
                norm=False,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
            spatial, prefix = feats[0]  # prefix: CLS then registers, like the official order
            return torch.cat((prefix, spatial), dim=1)
        out = m(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[block % self.arch.depth + 1]

    def _final_norm(self, t: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.layernorm(t) if self.backend == "transformers" else m.norm(t)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def _resolve_arch(name: str | None, arch: Mapping[str, Any] | DinoV2Arch | None) -> tuple[DinoV2Arch, str, int]:
    """Arch from a known name and/or explicit sizes; returns (arch, base key or '', registers)."""
    if isinstance(arch, DinoV2Arch):
        return arch, "", arch.num_register_tokens
    overrides = dict(arch or {})
    if name is not None and name.startswith("dinov2_") and not overrides.get("embed_dim"):
        base, regs = parse_name(name)
        a = DINOV2_ARCHS[base]
        if regs:
            # dinov2/hub/backbones.py: the *_reg entry points use 4 registers, antialiased interpolation, offset 0
            a = replace(a, num_register_tokens=regs, interpolate_antialias=True, interpolate_offset=0.0)
        return (replace(a, **overrides) if overrides else a), base, regs
    if not overrides:
        raise InputError("build_dinov2: give a known name (e.g. 'dinov2_vitl14') or arch sizes (embed_dim, ...)")
    try:
        a = DinoV2Arch(**overrides)
    except TypeError as exc:
        raise InputError(f"build_dinov2: bad arch arguments {overrides}: {exc}") from exc
    return a, "", a.num_register_tokens


def build_dinov2(
    name: str | None = "dinov2_vitl14",
    *,
    arch: Mapping[str, Any] | DinoV2Arch | None = None,
    source: str = "incontext",
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    hub_repo: str | os.PathLike | None = None,
    hub_entry: str | None = None,
    offline: bool = True,
    device: str | torch.device = "cpu",
    weights_key: str = "backbone.weights",
) -> DinoFeatures:
    """Build a DINOv2 feature extractor.

    Args:
        name: known model (``dinov2_vit{s,b,l,g}14[_reg]``) or any id for a custom ``arch`` (e.g. ``dinov2_tiny``).
        arch: explicit sizes (``DinoV2Arch`` fields); override/replace those of ``name``.
        source: ``incontext`` | ``hub`` | ``timm`` | ``transformers`` (see the module docstring), or ``auto``:
            ``hub`` when a local copy of the hub code exists (``hub_repo`` or the torch hub cache), else
            ``incontext`` (same outputs). The choice is recorded in ``DinoFeatures.backend``.
        weights: ``"random"`` for a seeded random init (tests, benchmarks); a checkpoint path
            (official keys; .pth/.pt via ``weights_only=True`` or .safetensors); a local Hugging Face folder for
            ``source="transformers"``; ``None`` = look the known file up locally (``python -m incontext.weights``)
            and raise ``WeightsNotFoundError`` if it is not there.
        seed: torch seed for ``weights="random"``.
        hub_repo: local clone of ``facebookresearch/dinov2`` (or any dir with a ``hubconf.py``) for
            ``source="hub"``; default: the torch hub cache.
        hub_entry: hub entry point (default ``name``).
        offline: for ``source="hub"``: never use the network (load from ``hub_repo``/the hub cache).
        device: where the model runs.
        weights_key: the config key named in "weights not found" messages (where the caller's config keeps
            this backbone's ``weights``).
    """
    a, base, regs = _resolve_arch(name, arch)
    if source not in ("auto", "incontext", "hub", "timm", "transformers"):
        raise InputError(f"build_dinov2: source={source!r}; use auto, incontext, hub, timm or transformers")
    if source == "auto":
        # the torch.hub code when a local copy exists (the published loading path), else the in-package model
        has_hub = (Path(hub_repo) / "hubconf.py").is_file() if hub_repo is not None else default_hub_repo() is not None
        source = "hub" if has_hub else "incontext"
    state_dict = None
    weights = weights_path(name, weights, config_key=weights_key)
    if str(weights) != "random" and not (source == "transformers" and Path(weights).is_dir()):
        label = f"DINOv2 weights ({name})"
        state_dict = read_state_dict(weights, name=label)
        check_keys(state_dict, DinoV2ViT_keys(a), name=label, path=weights)
    built = None
    if str(weights) == "random":
        torch.manual_seed(seed)
        built = DinoV2ViT(a)  # the random init is defined by our module; other sources copy its weights
        state_dict = built.state_dict()

    if source == "incontext":
        if built is not None:
            model = built
        else:
            # no random init to throw away (ViT-g: seconds and 4.5 GB): build on meta, adopt the loaded tensors
            with torch.device("meta"):
                model = DinoV2ViT(a)
            sd32 = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
            model.load_state_dict(sd32, strict=True, assign=True)
    elif source == "hub":
        model = _load_hub(name, a, state_dict, hub_repo, hub_entry or name, offline)
    elif source == "timm":
        model = _load_timm(a, base, state_dict)
    elif source == "transformers":
        model = _load_transformers(a, state_dict, weights)
    uid = model_id(name or "dinov2_custom", weights, seed=seed, arch=a)
    return DinoFeatures(model, backend=source, arch=a, name=uid).to(device)


def DinoV2ViT_keys(arch: DinoV2Arch) -> list[str]:  # noqa: N802 (named after the class it describes)
    """Official state-dict keys of ``arch`` (built on the meta device, so free for ViT-g)."""
    with torch.device("meta"):
        return list(DinoV2ViT(arch).state_dict().keys())


def _load_hub(label, arch, state_dict, hub_repo, entry, offline) -> nn.Module:
    repo = Path(hub_repo) if hub_repo is not None else default_hub_repo()
    if repo is None or not (repo / "hubconf.py").is_file():
        if offline:
            where = str(repo) if repo is not None else f"{torch.hub.get_dir()}/facebookresearch_dinov2_main"
            raise WeightsNotFoundError(
                f"DINOv2 hub code for {label!r} not found: looked for hubconf.py in {where}. Get it with "
                f"`git clone https://github.com/facebookresearch/dinov2 {where}`, set backbone.hub_repo to a "
                "local clone, or use backbone.source=incontext (same weights, no repository needed)"
            )
        model = torch.hub.load("facebookresearch/dinov2", entry, pretrained=False, trust_repo=True)
    else:
        model = torch.hub.load(str(repo), entry, source="local", pretrained=False)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        raise InputError(
            f"DINOv2 hub model {entry!r} from {repo} does not match the weights: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; check hub_entry and the architecture"
        )
    return model.eval()


def _load_timm(arch: DinoV2Arch, base: str, state_dict) -> nn.Module:
    import timm

    timm_name = _TIMM_NAMES.get(base, "vit_small_patch14_dinov2")
    if arch.num_register_tokens:
        timm_name = timm_name.replace("_dinov2", "_reg4_dinov2")
    kwargs: dict[str, Any] = dict(
        pretrained=False,
        num_classes=0,
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        qkv_bias=arch.qkv_bias,
        init_values=arch.init_values,
    )
    if arch.ffn_layer == "mlp":
        kwargs["mlp_ratio"] = arch.mlp_ratio
    else:
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * arch.swiglu_hidden / arch.embed_dim)
    if arch.num_register_tokens:
        kwargs["reg_tokens"] = arch.num_register_tokens
    model = timm.create_model(timm_name, **kwargs)
    model.load_state_dict(official_to_timm(state_dict), strict=True)
    return model.eval()


def _load_transformers(arch: DinoV2Arch, state_dict, weights) -> nn.Module:
    from transformers import Dinov2Model

    if state_dict is None:  # a local Hugging Face folder
        return Dinov2Model.from_pretrained(str(weights), local_files_only=True).eval()
    model = Dinov2Model(transformers_config(arch))
    conv = official_to_transformers(state_dict)
    check_keys(conv, model.state_dict().keys(), name="DINOv2 weights (transformers layout)")
    model.load_state_dict(conv, strict=True)
    return model.eval()


def from_arch_json(
    path: str | os.PathLike, weights: str | os.PathLike | None = None, *, source: str = "incontext",
    device: str | torch.device = "cpu", verify_sha256: bool = True,
) -> DinoFeatures:
    """Build the DINOv2 described by a parity-fixture ``arch.json`` (its ``"dinov2"`` entry).

    ``weights`` defaults to the file named in the JSON, next to it; its SHA-256 is checked when given.
    Example: ``from_arch_json("/work/shared/parity/matcher/weights/seed0/arch.json")``.
    """
    p = Path(path)
    spec = json.loads(p.read_text())
    spec = spec.get("dinov2", spec)
    kw = dict(spec["kwargs"])
    for k in ("block_chunks", "drop_path_rate"):  # training-only / layout-only options of the official class
        kw.pop(k, None)
    fields = set(DinoV2Arch.__dataclass_fields__)
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise InputError(f"from_arch_json: {p}: unsupported DINOv2 kwargs {unknown}")
    a = DinoV2Arch(**kw)
    wpath = Path(weights) if weights is not None else p.parent / spec["file"]
    if verify_sha256 and weights is None and spec.get("sha256"):
        got = sha256_file(wpath)
        if got != spec["sha256"]:
            raise InputError(f"from_arch_json: {wpath} has SHA-256 {got}, arch.json expects {spec['sha256']}")
    return build_dinov2(f"dinov2_{p.parent.name}", arch=a, source=source, weights=wpath, device=device)


# Re-exported for configs that want the plain dataclass as a dict.
def arch_dict(arch: DinoV2Arch) -> dict[str, Any]:
    """``DinoV2Arch`` as a plain dict (JSON-able)."""
    return asdict(arch)

