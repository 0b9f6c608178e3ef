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
from incontext.backbones.weights import find, search_dirs
from incontext.errors import InputError, WeightsNotFoundError

__all__ = ["SHIPPED_NAME", "shipped_dir", "load_sam_folder", "build_shipped_sam", "build_default_sam"]

SHIPPED_NAME = "sam_tiny_synthetic"
_announced: set[str] = set()


def shipped_dir() -> Path | None:
    """The first ``sam_tiny_synthetic`` folder in the weights search places (project ``weights/`` included)."""
    for d in search_dirs():
        if (d / SHIPPED_NAME / "model.safetensors").is_file() and (d / SHIPPED_NAME / "config.json").is_file():
            return d / SHIPPED_NAME
    return None


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
    return build_sam(name or cfg.get("name", SHIPPED_NAME), arch=cfg["arch"], weights=w_path, device=device)


def build_shipped_sam(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                      name: str = SHIPPED_NAME) -> BatchedSamPredictor:
    """Config entry point of ``configs/backbone/sam_tiny_synthetic.yaml``: ``weights`` = a folder (default: the
    shipped ``weights/sam_tiny_synthetic``)."""
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
