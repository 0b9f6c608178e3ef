"""The SAM trained in this project (``sam_tiny_synthetic``) and the offline default for SAM-based methods.

``sam_tiny_synthetic`` is the ``segment_anything`` ``Sam`` in a small size, trained from scratch by
``python train.py experiment=sam_tiny_synthetic`` on the procedural benchmark's train-split scenes with SAM's
interactive recipe (``incontext.train.sam_task``). It ships in ``weights/sam_tiny_synthetic/`` as a Hugging
Face-layout folder: ``config.json`` (the ``SamArch`` sizes) + ``model.safetensors`` (official key names).

:func:`build_default_sam` is a drop-in for :func:`incontext.backbones.sam.build_sam`: with a checkpoint found
(configured path or the usual local places) it builds exactly what ``build_sam`` builds; when the config leaves
``weights`` unset and no official SAM file exists locally it prints one line and returns the shipped model
instead of failing. It never replaces a path the user configured, nor ``weights=random``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from incontext.backbones.sam import BatchedSamPredictor, _registry_key, build_sam
from incontext.backbones.weights import find, search_dirs, shipped
from incontext.errors import InputError, WeightsNotFoundError

__all__ = ["SHIPPED_NAME", "shipped_dir", "load_sam_folder", "build_shipped_sam", "build_default_sam",
           "SamEncoderFeatures", "build_shipped_features"]

SHIPPED_NAME = "sam_tiny_synthetic"
_announced: set[str] = set()


def shipped_dir() -> Path | None:
    """The first ``sam_tiny_synthetic`` folder in the weights search places (project ``weights/`` included)."""
    return shipped(SHIPPED_NAME, search_dirs())


def load_sam_folder(folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                    name: str | None = None) -> BatchedSamPredictor:
    """A ``BatchedSamPredictor`` from a folder written by the SAM training task (config.json + model.safetensors;
    e.g. ``runs/sam_tiny_synthetic/checkpoints/best``)."""
    p = Path(folder).expanduser()
    cfg_path, w_path = p / "config.json", p / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise WeightsNotFoundError(
            f"SAM folder {str(p)!r} lacks config.json or model.safetensors; point sam.weights at a folder written "
            "by `python train.py experiment=sam_tiny_synthetic` (its checkpoints/best) or at weights/"
            f"{SHIPPED_NAME}"
        )
    cfg = json.loads(cfg_path.read_text())
    if "arch" not in cfg:
        raise InputError(f"{cfg_path}: no 'arch' entry; not a SAM folder written by incontext.train.sam_task")
    # Built under the folder's own name (never an official one, whose file-size checks would apply).
    pred = build_sam(cfg.get("name", SHIPPED_NAME), arch=cfg["arch"], weights=w_path, device=device)
    if name and _registry_key(name) is None:
        pred.name = f"{name}@{p.name}"
    return pred


def build_shipped_sam(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                      name: str = SHIPPED_NAME, arch: Mapping[str, Any] | None = None, seed: int = 0,
                      weights_key: str = "backbone.weights") -> BatchedSamPredictor:
    """Config entry point of ``configs/backbone/sam_tiny_synthetic.yaml``: ``weights`` = a folder (default: the
    shipped ``weights/sam_tiny_synthetic``). ``arch``/``seed``/``weights_key`` are accepted so the node can
    replace any SAM backbone node; the sizes always come from the folder's config.json."""
    if arch is not None:
        raise InputError(f"{name}: arch is read from the folder's config.json; remove the arch setting")
    folder = Path(weights) if weights is not None else shipped_dir()
    if folder is None:
        looked = "; ".join(str(d / SHIPPED_NAME) for d in search_dirs())
        raise WeightsNotFoundError(
            f"weights {SHIPPED_NAME!r} not found: no config.json + model.safetensors at {looked}. It ships in the "
            f"repository's weights/{SHIPPED_NAME}; rebuild it with `python train.py experiment=sam_tiny_synthetic` "
            f"and set backbone.weights=runs/sam_tiny_synthetic/checkpoints/best"
        )
    return load_sam_folder(folder, device=device, name=name)


def build_default_sam(
    name: str | None = "sam_vit_h",
    *,
    arch: Mapping[str, Any] | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    weights_key: str = "backbone.weights",
    fallback: str | None = SHIPPED_NAME,
) -> BatchedSamPredictor:
    """``build_sam`` with the offline default: an official SAM (``sam_vit_{h,l,b}``) whose ``weights`` are unset
    and whose file is not found locally becomes the shipped ``sam_tiny_synthetic`` (one line on stderr, once per
    process and name). ``fallback=null`` restores ``build_sam``'s error."""
    if weights is None and arch is None and fallback and _registry_key(name) is not None:
        found, looked = find(name)
        if found is None:
            sam = build_shipped_sam(device=device)
            if name not in _announced:
                _announced.add(name)
                print(f"incontext: no {name} checkpoint found locally (looked in {len(looked)} places); using the "
                      f"shipped {SHIPPED_NAME} (trained here on procedural scenes) - set {weights_key}=<path to "
                      f"the official file> for the real SAM", file=sys.stderr)
            return sam
    return build_sam(name, arch=arch, weights=weights, seed=seed, device=device, weights_key=weights_key)


class SamEncoderFeatures:
    """Patch features from a SAM image encoder with the interface Matcher expects of DINOv2 features
    (``normalize``, ``patch_tokens(...)["prenorm"]``, ``patch_size``): the offline patch-feature backbone for
    Matcher when no DINOv2 checkpoint is available, built from the SAM trained here (never a random encoder).

    Images arrive square at Matcher's working size ``work_size`` (a multiple of SAM's token grid, e.g. 512 for
    16x16 tokens, so ``patch_size`` = work_size / grid pixels); they are resized to SAM's input size, normalised
    with SAM's pixel statistics and encoded; tokens are the neck output (B, grid * grid, C), row-major. There is
    no separate pre/post-norm pair: "prenorm" and "normed" are both the neck output.

    Args:
        sam: a ``BatchedSamPredictor`` (e.g. :func:`build_shipped_sam`).
        work_size: the square size Matcher works at (its ``image_size``).
    """

    def __init__(self, sam: BatchedSamPredictor, work_size: int = 512) -> None:
        self.sam_model = sam.model
        grid = int(self.sam_model.prompt_encoder.image_embedding_size[0])
        if int(work_size) % grid:
            raise InputError(f"SamEncoderFeatures: work_size={work_size} is not a multiple of SAM's {grid}-token "
                             f"grid; use {grid * round(int(work_size) / grid)} (and the same Matcher image_size)")
        self.patch_size = int(work_size) // grid
        self.work_size = int(work_size)
        self.embed_dim = int(self.sam_model.mask_decoder.transformer_dim)
        self.name = f"sam_encoder[{getattr(sam, 'name', 'sam')}]"
        self.model = self.sam_model.image_encoder

    def to(self, device: str | torch.device) -> "SamEncoderFeatures":
        self.sam_model.to(device)
        return self

    def normalize(self, images: Any) -> torch.Tensor:
        """(B, S, S, 3) uint8 (numpy or tensor) -> (B, 3, s, s) float, SAM-normalised at SAM's input size s."""
        import torch.nn.functional as F

        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
            raise InputError(f"SamEncoderFeatures.normalize: images {tuple(x.shape)}; expected (B, S, S, 3) uint8")
        dev = self.sam_model.pixel_mean.device
        x = x.to(dev).permute(0, 3, 1, 2).float()
        s = int(self.sam_model.image_encoder.img_size)
        if x.shape[-1] != s:
            x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.sam_model.pixel_mean) / self.sam_model.pixel_std

    @torch.inference_mode()
    def patch_tokens(self, x: torch.Tensor, batch_size: int = 8, block: int | None = None) -> dict[str, torch.Tensor]:
        """Encoder neck tokens: {"prenorm", "normed"}: (B, grid * grid, C) row-major."""
        if block is not None:
            raise InputError("SamEncoderFeatures.patch_tokens: only the neck output is available (block=None)")
        outs = []
        for i in range(0, len(x), max(1, int(batch_size))):
            f = self.sam_model.image_encoder(x[i : i + batch_size])
            outs.append(f.flatten(2).transpose(1, 2))
        t = torch.cat(outs)
        return {"prenorm": t, "normed": t}


def build_shipped_features(weights: str | os.PathLike | None = None, *, work_size: int = 512,
                           device: str | torch.device = "cpu", weights_key: str = "backbone.weights"
                           ) -> SamEncoderFeatures:
    """Config entry point of ``configs/backbone/sam_tiny_synthetic_features.yaml``: the shipped SAM's image
    encoder as Matcher's patch-feature backbone (``weights_key`` accepted for drop-in use, unused)."""
    return SamEncoderFeatures(build_shipped_sam(weights, device=device), work_size=work_size)
