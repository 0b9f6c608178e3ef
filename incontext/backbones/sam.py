"""Segment Anything (PyPI ``segment-anything``) models and a batched predictor.

* :class:`SamArch` holds every size the package's ``_build_sam`` fixes (so tiny SAMs come from the same
  code path as ``vit_h``/``vit_l``/``vit_b``); :func:`build_sam_model` assembles ``segment_anything.modeling``
  classes from it. Known names use ``sam_model_registry`` itself.
* :func:`build_sam` (config entry point) returns a :class:`BatchedSamPredictor`, a subclass of
  ``segment_anything.SamPredictor`` that keeps SAM's preprocessing (``ResizeLongestSide(1024)``, pixel
  normalisation, zero padding to 1024^2) and decodes many prompt sets for one image in one batched decoder
  call, with predicted IoU and SAM's stability score (threshold 0.0, offset 1.0).
* Hooks for methods that alter the decoder (PerSAM): :meth:`BatchedSamPredictor.decode_torch` takes a
  ``decoder`` callable and extra keyword arguments passed to it, and the pieces (``embed``,
  ``prompt_embeddings``, ``postprocess``) are public.

Frames: "original" = pixels of the image given to ``set_image`` / ``embed`` (x = column, y = row);
"input" = the ResizeLongestSide(1024) frame SAM's prompt encoder expects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import calculate_stability_score

from incontext.backbones.checkpoint import check_keys, model_id, read_state_dict, sha256_file
from incontext.backbones.weights import weights_path
from incontext.errors import InputError

__all__ = [
    "SamArch",
    "SAM_ARCHS",
    "build_sam_model",
    "build_sam",
    "sam_from_config_json",
    "BatchedSamPredictor",
    "SamEmbedding",
    "SamDecodeResult",
]


@dataclass(frozen=True)
class SamArch:
    """All constructor sizes of a SAM (names as in ``segment_anything.build_sam._build_sam``).

    Defaults are the fixed values of the released models (prompt dim 256, image 1024, patch 16, window 14,
    mask-input channels 16, two-way transformer depth 2 / MLP 2048 / 8 heads, IoU head 3 x 256).
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    vit_patch_size: int = 16
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    encoder_qkv_bias: bool = True
    encoder_use_rel_pos: bool = True
    encoder_use_abs_pos: bool = True
    encoder_layer_norm_eps: float = 1e-6
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_transformer_depth: int = 2
    decoder_transformer_mlp_dim: int = 2048
    decoder_transformer_num_heads: int = 8
    decoder_attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_global_attn_indexes", tuple(self.encoder_global_attn_indexes))
        object.__setattr__(self, "pixel_mean", tuple(self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(self.pixel_std))
        d = self.prompt_embed_dim
        problems = []
        if self.image_size % self.vit_patch_size:
            problems.append(f"image_size={self.image_size} not a multiple of vit_patch_size={self.vit_patch_size}")
        if d % 8:
            problems.append(f"prompt_embed_dim={d} must be a multiple of 8 (mask upscaling to dim/8 channels)")
        if (d // self.decoder_attention_downsample_rate) % self.decoder_transformer_num_heads:
            problems.append(
                f"prompt_embed_dim/{self.decoder_attention_downsample_rate}={d // 2} not divisible by "
                f"decoder_transformer_num_heads={self.decoder_transformer_num_heads}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(
                f"encoder_embed_dim={self.encoder_embed_dim} not divisible by encoder_num_heads="
                f"{self.encoder_num_heads}"
            )
        if self.mask_in_chans % 4:
            problems.append(f"mask_in_chans={self.mask_in_chans} must be a multiple of 4")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            problems.append(
                f"encoder_global_attn_indexes={list(self.encoder_global_attn_indexes)} outside "
                f"0..{self.encoder_depth - 1}"
            )
        if self.image_format not in ("RGB", "BGR"):
            problems.append(f"image_format={self.image_format!r} must be 'RGB' or 'BGR'")
        if problems:
            raise InputError("SAM arch: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        """Side of the image-embedding grid (64 for 1024/16)."""
        return self.image_size // self.vit_patch_size


# Released sizes: segment_anything/build_sam.py (build_sam_vit_h / _l / _b).
SAM_ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
}


def _registry_key(name: str | None) -> str | None:
    """``"sam_vit_h"``/``"vit_h"`` -> ``"vit_h"``; other names -> None."""
    if name is None:
        return None
    key = name[len("sam_"):] if name.startswith("sam_") else name
    return key if key in SAM_ARCHS else None


def build_sam_model(arch: SamArch) -> Sam:
    """Assemble a randomly initialised ``Sam`` from ``arch`` with the package's modules (PyTorch default init).

    Same module tree and key names as ``sam_model_registry``; seed ``torch`` before calling for a
    reproducible init.
    """
    d, grid = arch.prompt_embed_dim, arch.grid
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=arch.encoder_mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=arch.encoder_layer_norm_eps),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.vit_patch_size,
            qkv_bias=arch.encoder_qkv_bias,
            use_abs_pos=arch.encoder_use_abs_pos,
            use_rel_pos=arch.encoder_use_rel_pos,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.encoder_window_size,
            out_chans=d,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=d,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_transformer_depth,
                embedding_dim=d,
                mlp_dim=arch.decoder_transformer_mlp_dim,
                num_heads=arch.decoder_transformer_num_heads,
                attention_downsample_rate=arch.decoder_attention_downsample_rate,
            ),
            transformer_dim=d,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(arch.pixel_mean),
        pixel_std=list(arch.pixel_std),
    )
    model.image_format = arch.image_format
    if arch.mask_threshold != Sam.mask_threshold:
        model.mask_threshold = arch.mask_threshold
    return model.eval()


def _build_loaded(build: Callable[[], Sam], weights: str | os.PathLike, name: str) -> Sam:
    """``build()`` with the checkpoint's tensors, without a throw-away random init (SAM ViT-H: 2.5 GB).

    The module tree is built on the meta device and adopts the loaded tensors (``assign=True``); should any
    tensor stay on meta (a buffer outside the state dict), it falls back to a normal build + load.
    """
    label = f"SAM weights ({name})"
    sd = read_state_dict(weights, name=label)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        model = build()
    check_keys(sd, model.state_dict().keys(), name=label, path=weights)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model = build()
            model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # shape mismatch: right keys, other size (e.g. vit_b file for vit_h)
        raise InputError(
            f"{label}: {str(weights)!r} has the right keys but other tensor shapes ({exc}); "
            "pick the checkpoint of this model size (sam_vit_h/_l/_b) or set the matching backbone.name"
        ) from exc
    return model.eval()


def load_sam(
    name: str | None = "sam_vit_h",
    *,
    arch: Mapping[str, Any] | SamArch | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    weights_key: str = "backbone.weights",
) -> Sam:
    """The ``Sam`` module: known name (``sam_vit_{h,l,b}``) via ``sam_model_registry`` or explicit ``arch``.

    ``weights``: a checkpoint (``.pth`` read with ``weights_only=True``, or ``.safetensors``; strict keys);
    ``"random"`` for a seeded random init; ``None`` looks the known file up locally and raises
    ``WeightsNotFoundError`` if absent (see ``python -m incontext.weights``); ``weights_key`` is the config
    key that message names.
    """
    key = _registry_key(name)
    if arch is None and key is None:
        raise InputError(
            f"SAM name {name!r} is unknown; use sam_vit_h, sam_vit_l, sam_vit_b or pass arch sizes explicitly"
        )
    weights = weights_path(name, weights, config_key=weights_key)
    if arch is None:
        build = partial(sam_model_registry[key], checkpoint=None)
    else:
        a = arch if isinstance(arch, SamArch) else _arch_from_mapping(arch)
        build = partial(build_sam_model, a)
    if str(weights) == "random":
        torch.manual_seed(seed)
        return build().eval()
    return _build_loaded(build, weights, name or "sam")


def _arch_from_mapping(kw: Mapping[str, Any]) -> SamArch:
    fields = set(SamArch.__dataclass_fields__)
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise InputError(f"SAM arch: unknown arguments {unknown}; known: {sorted(fields)}")
    try:
        return SamArch(**kw)
    except TypeError as exc:
        raise InputError(f"SAM arch: {exc}") from exc


def arch_from_persam_config(cfg: Mapping[str, Any]) -> SamArch:
    """``SamArch`` from the per-module format of ``parity/persam/model/model_config.json``."""
    ie, pe, md = cfg["image_encoder"], cfg["prompt_encoder"], cfg["mask_decoder"]
    tr = md["transformer"]
    if ie["out_chans"] != pe["embed_dim"] or md["transformer_dim"] != tr["embedding_dim"] != pe["embed_dim"]:
        raise InputError("SAM config: out_chans, prompt embed_dim and decoder dims must be equal")
    acts = (ie.get("act_layer", "GELU"), pe.get("activation", "GELU"), md.get("activation", "GELU"))
    if acts != ("GELU", "GELU", "GELU") or tr.get("activation", "ReLU") != "ReLU":
        raise InputError(f"SAM config: activations {acts}/{tr.get('activation')} differ from SAM's GELU/ReLU")
    return SamArch(
        encoder_embed_dim=ie["embed_dim"],
        encoder_depth=ie["depth"],
        encoder_num_heads=ie["num_heads"],
        encoder_global_attn_indexes=tuple(ie["global_attn_indexes"]),
        image_size=ie["img_size"],
        vit_patch_size=ie["patch_size"],
        encoder_window_size=ie["window_size"],
        encoder_mlp_ratio=ie["mlp_ratio"],
        encoder_qkv_bias=ie["qkv_bias"],
        encoder_use_rel_pos=ie["use_rel_pos"],
        encoder_use_abs_pos=ie.get("use_abs_pos", True),
        encoder_layer_norm_eps=ie.get("norm_eps", 1e-6),
        prompt_embed_dim=pe["embed_dim"],
        mask_in_chans=pe["mask_in_chans"],
        decoder_transformer_depth=tr["depth"],
        decoder_transformer_mlp_dim=tr["mlp_dim"],
        decoder_transformer_num_heads=tr["num_heads"],
        decoder_attention_downsample_rate=tr.get("attention_downsample_rate", 2),
        num_multimask_outputs=md["num_multimask_outputs"],
        iou_head_depth=md["iou_head_depth"],
        iou_head_hidden_dim=md["iou_head_hidden_dim"],
        pixel_mean=tuple(cfg["pixel_mean"]),
        pixel_std=tuple(cfg["pixel_std"]),
        mask_threshold=cfg.get("mask_threshold", 0.0),
        image_format=cfg.get("image_format", "RGB"),
    )


def sam_from_config_json(
    path: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    verify_sha256: bool = True,
) -> BatchedSamPredictor:
    """Predictor for a parity-fixture SAM description.

    Accepts Matcher's ``weights/<dir>/arch.json`` (``"sam": {"file", "sha256", "kwargs"}``; weights default
    to the file next to it) and PerSAM's ``model/model_config.json`` (per-module arguments; weights default to
    ``weights.safetensors`` next to it). The SHA-256 recorded in the JSON is checked for the default file.
    """
    p = Path(path)
    spec = json.loads(p.read_text())
    if "sam" in spec:
        s = spec["sam"]
        kw = {k: v for k, v in s["kwargs"].items()}
        kw["encoder_global_attn_indexes"] = tuple(kw["encoder_global_attn_indexes"])
        arch = _arch_from_mapping(kw)
        default_file, digest = p.parent / s["file"], s.get("sha256")
    elif "image_encoder" in spec:
        arch = arch_from_persam_config(spec)
        default_file, digest = p.parent / "weights.safetensors", spec.get("weights_sha256")
    else:
        raise InputError(f"sam_from_config_json: {p} is neither a Matcher arch.json nor a PerSAM model_config.json")
    wpath = Path(weights) if weights is not None else default_file
    if verify_sha256 and weights is None and digest:
        got = sha256_file(wpath)
        if got != digest:
            raise InputError(f"sam_from_config_json: {wpath} has SHA-256 {got}, {p.name} expects {digest}")
    name = f"sam_{p.parent.name}"
    model = load_sam(name, arch=arch, weights=wpath)
    return BatchedSamPredictor(model.to(device), name=model_id(name, wpath))


def build_sam(
    name: str | None = "sam_vit_h",
    *,
    arch: Mapping[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    weights_key: str = "backbone.weights",
) -> BatchedSamPredictor:
    """Config entry point: :func:`load_sam` then :class:`BatchedSamPredictor` on ``device``."""
    path = weights_path(name, weights, config_key=weights_key)
    model = load_sam(name, arch=arch, weights=path, seed=seed)
    uid = model_id(name or "sam", path, seed=seed, arch=arch if arch is not None else _registry_key(name))
    return BatchedSamPredictor(model.to(device), name=uid)


# --------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------


@dataclass
class SamEmbedding:
    """One encoded image: ``features`` (1, C, g, g) neck output (g = 64 for SAM), ``original_size`` (H, W) of
    the image given, ``input_size`` (h, w) after ResizeLongestSide (before padding)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass
class SamDecodeResult:
    """Outputs for N prompt sets and M masks per set (M = 3 with multimask, else 1).

    Attributes:
        low_res_logits: (N, M, 256, 256) float, in the padded 1024 frame at 1/4 scale (SAM's mask-input frame).
        iou_pred: (N, M) float, the decoder's predicted IoU.
        stability: (N, M) float, IoU of (logits > t + offset) and (logits > t - offset) at original size
            (SAM's ``calculate_stability_score``, t = ``mask_threshold`` 0.0, offset 1.0 by default).
        masks: (N, M, H, W) bool at original size (logits > mask_threshold).
        logits: (N, M, H, W) float at original size, or None unless ``return_logits=True``.
        extras: decoder-specific outputs (empty for SAM's own decoder).
    """

    low_res_logits: torch.Tensor
    iou_pred: torch.Tensor
    stability: torch.Tensor
    masks: torch.Tensor
    logits: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class BatchedSamPredictor(SamPredictor):
    """``SamPredictor`` that decodes many prompt sets for one image in one decoder call.

    Use ``set_image(image)`` (SAM's own preprocessing) or ``set_embedding(embed(image))`` (re-use a cached
    encoding), then :meth:`decode` with N prompt sets. ``predict``/``predict_torch`` of the base class keep
    working.
    """

    def __init__(self, sam_model: Sam, name: str = "sam"):
        super().__init__(sam_model)
        self.name = name
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    # ---- encoding ------------------------------------------------------------------------------
    def _check_image(self, image: np.ndarray) -> np.ndarray:
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise InputError(f"SAM image: got {a.dtype} array of shape {a.shape}; expected (H, W, 3) uint8 RGB")
        return a

    def preprocess_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, S, S) float: exactly what ``set_image`` feeds the encoder (S = 1024).

        ResizeLongestSide (the package's transform), pixel mean/std normalisation, zero padding at the bottom and
        right. PerSAM runs its 3-channel reference mask through this same path (see shared/reference/persam.md).
        """
        a = self._check_image(image)
        resized = torch.as_tensor(self.transform.apply_image(a), device=self.device)
        return self.model.preprocess(resized.permute(2, 0, 1).contiguous()[None].float())

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` ((H, W, 3) uint8) with SAM's preprocessing and keep its features."""
        if image_format not in ("RGB", "BGR"):
            raise InputError(f"SAM image_format={image_format!r}; use 'RGB' or 'BGR'")
        super().set_image(self._check_image(image), image_format)

    def embed(self, image: np.ndarray, image_format: str = "RGB") -> SamEmbedding:
        """Encode ``image`` and return its :class:`SamEmbedding` (also becomes the current image)."""
        self.set_image(image, image_format)
        return self.current_embedding()

    def current_embedding(self) -> SamEmbedding:
        if not self.is_image_set:
            raise RuntimeError("no image set: call set_image(image) or set_embedding(embedding) first")
        return SamEmbedding(self.features, tuple(self.original_size), tuple(self.input_size))

    def set_embedding(self, emb: SamEmbedding) -> None:
        """Make a previously computed embedding current (no encoder pass)."""
        g = self.model.prompt_encoder.image_embedding_size
        f = emb.features
        if f.ndim != 4 or f.shape[0] != 1 or tuple(f.shape[-2:]) != tuple(g):
            raise InputError(f"SAM embedding: features {tuple(f.shape)}; expected (1, C, {g[0]}, {g[1]})")
        self.reset_image()
        self.features = f.to(self.device)
        self.original_size = tuple(int(v) for v in emb.original_size)
        self.input_size = tuple(int(v) for v in emb.input_size)
        self.is_image_set = True

    # ---- frames --------------------------------------------------------------------------------
    def to_input_frame(self, coords: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Points (..., 2) xy in original pixels -> the 1024 input frame (boxes: reshape to (..., 2, 2))."""
        self._require_image()
        if isinstance(coords, torch.Tensor):
            return self.transform.apply_coords_torch(coords, self.original_size)
        return self.transform.apply_coords(np.asarray(coords), self.original_size)

    def postprocess(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """(N, M, 256, 256) low-res logits -> (N, M, H, W) logits at original size (SAM's upsample/crop/resize)."""
        self._require_image()
        return self.model.postprocess_masks(low_res_logits, self.input_size, self.original_size)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image set: call set_image(image) or set_embedding(embedding) first")

    # ---- decoding ------------------------------------------------------------------------------
    def prompt_embeddings(
        self,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM prompt encoder on input-frame prompts: sparse (N, T, C) and dense (N, C, g, g) embeddings."""
        points = (coords, labels) if coords is not None else None
        return self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)

    @torch.inference_mode()
    def decode_torch(
        self,
        coords: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        *,
        multimask_output: bool = True,
        batch_size: int = 64,
        return_logits: bool = False,
        stability_offset: float = 1.0,
        decoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        decoder_kwargs: Mapping[str, Any] | None = None,
    ) -> SamDecodeResult:
        """Decode N prompt sets, already in the 1024 input frame, ``batch_size`` sets per decoder call.

        Args:
            coords: (N, k, 2) xy, input frame; ``labels`` (N, k): 1 foreground, 0 background, -1 padding.
            boxes: (N, 4) xyxy, input frame.
            mask_input: (N, 1, 256, 256) low-res logits (e.g. a previous ``low_res_logits`` channel).
            multimask_output: 3 masks per set (tokens 1..3) or 1 (token 0), as SAM.
            decoder: replaces ``self.model.mask_decoder`` (same call signature plus ``decoder_kwargs``), e.g. a
                PerSAM decoder taking ``attn_sim``/``target_embedding``. It returns (low-res logits, iou_pred)
                or (low-res logits, iou_pred, extras dict).
        """
        self._require_image()
        n = _num_sets(coords, labels, boxes, mask_input)
        dec = decoder if decoder is not None else self.model.mask_decoder
        dkw = dict(decoder_kwargs or {})
        dev = self.device
        lows, ious, stabs, masks, logits_all, extras = [], [], [], [], [], []
        image_pe = self.model.prompt_encoder.get_dense_pe()
        for s in range(0, n, batch_size):
            sl = slice(s, min(s + batch_size, n))
            c = coords[sl].to(dev) if coords is not None else None
            lab = labels[sl].to(dev) if labels is not None else None
            b = boxes[sl].to(dev) if boxes is not None else None
            m = mask_input[sl].to(dev, torch.float32) if mask_input is not None else None
            sparse, dense = self.prompt_embeddings(c, lab, b, m)
            out = dec(
                image_embeddings=self.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                **dkw,
            )
            low, iou = out[0], out[1]
            if len(out) > 2:
                extras.append(out[2])
            full = self.postprocess(low)
            lows.append(low)
            ious.append(iou)
            stabs.append(calculate_stability_score(full, self.model.mask_threshold, stability_offset))
            masks.append(full > self.model.mask_threshold)
            if return_logits:
                logits_all.append(full)
        return SamDecodeResult(
            low_res_logits=torch.cat(lows),
            iou_pred=torch.cat(ious),
            stability=torch.cat(stabs),
            masks=torch.cat(masks),
            logits=torch.cat(logits_all) if return_logits else None,
            extras={"decoder": extras} if extras else {},
        )

    def decode(
        self,
        points: np.ndarray | torch.Tensor | None = None,
        labels: np.ndarray | torch.Tensor | None = None,
        boxes: np.ndarray | torch.Tensor | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        *,
        multimask_output: bool = True,
        batch_size: int = 64,
        return_logits: bool = False,
        stability_offset: float = 1.0,
        coord_dtype: torch.dtype = torch.float32,
        decoder: Callable[..., Any] | None = None,
        decoder_kwargs: Mapping[str, Any] | None = None,
    ) -> SamDecodeResult:
        """Decode N prompt sets given in original pixels (see :meth:`decode_torch` for the outputs).

        Args:
            points: (N, k, 2) xy in original pixels (every set has k points; pad with label -1 to mix sizes,
                which SAM encodes as "not a point" and which changes the result compared with fewer points).
            labels: (N, k) ints; default all 1 (foreground).
            boxes: (N, 4) xyxy in original pixels.
            mask_input: (N, 1, 256, 256) low-res logits.
            coord_dtype: precision of the transformed coordinates. ``SamPredictor.predict`` uses float32 (the
                default); SAM's automatic mask generator (and Matcher's) keeps numpy's float64.
        """
        self._require_image()
        c = lab = b = m = None
        if points is not None:
            p = _as_array(points, "points")
            if p.ndim != 3 or p.shape[-1] != 2:
                raise InputError(f"SAM decode: points has shape {p.shape}; expected (N, k, 2) xy pixels")
            c = torch.as_tensor(self.transform.apply_coords(p, self.original_size), dtype=coord_dtype)
            if labels is None:
                lab = torch.ones(p.shape[:2], dtype=torch.int)
            else:
                la = _as_array(labels, "labels")
                if la.shape != p.shape[:2]:
                    raise InputError(f"SAM decode: labels has shape {la.shape}; expected {p.shape[:2]} (N, k)")
                lab = torch.as_tensor(la, dtype=torch.int)
        elif labels is not None:
            raise InputError("SAM decode: labels given without points")
        if boxes is not None:
            bx = _as_array(boxes, "boxes")
            if bx.ndim != 2 or bx.shape[-1] != 4:
                raise InputError(f"SAM decode: boxes has shape {bx.shape}; expected (N, 4) xyxy pixels")
            b = torch.as_tensor(self.transform.apply_boxes(bx, self.original_size), dtype=coord_dtype)
        if mask_input is not None:
            mi = torch.as_tensor(_as_array(mask_input, "mask_input"), dtype=torch.float32)
            want = tuple(4 * s for s in self.model.prompt_encoder.image_embedding_size)
            if mi.ndim != 4 or mi.shape[1] != 1 or tuple(mi.shape[-2:]) != want:
                raise InputError(
                    f"SAM decode: mask_input has shape {tuple(mi.shape)}; expected (N, 1, {want[0]}, {want[1]})"
                )
            m = mi
        return self.decode_torch(
            c, lab, b, m,
            multimask_output=multimask_output,
            batch_size=batch_size,
            return_logits=return_logits,
            stability_offset=stability_offset,
            decoder=decoder,
            decoder_kwargs=decoder_kwargs,
        )


def _as_array(x: np.ndarray | torch.Tensor | Sequence, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists
        raise InputError(f"SAM decode: {name} is not a rectangular array ({exc})") from exc


def _num_sets(coords, labels, boxes, mask_input) -> int:
    sizes = {
        k: int(v.shape[0])
        for k, v in (("points", coords), ("labels", labels), ("boxes", boxes), ("mask_input", mask_input))
        if v is not None
    }
    if not sizes:
        raise InputError("SAM decode: give at least one of points, boxes or mask_input")
    if len(set(sizes.values())) != 1:
        raise InputError(f"SAM decode: prompt sets disagree on N: {sizes}")
    if (coords is None) != (labels is None):
        raise InputError("SAM decode: coords and labels must be given together")
    return next(iter(sizes.values()))


def describe(arch: SamArch) -> dict[str, Any]:
    """``SamArch`` as a JSON-able dict."""
    from dataclasses import asdict

    d = asdict(arch)
    d["encoder_global_attn_indexes"] = list(arch.encoder_global_attn_indexes)
    return d

