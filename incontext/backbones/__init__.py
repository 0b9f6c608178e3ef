"""Backbones: DINOv2 (``dinov2``), SAM (``sam``), the known-weights table (``weights``), feature cache (``cache``).

Submodules are imported explicitly (``from incontext.backbones.dinov2 import build_dinov2``) so that using one
backbone does not import the others' libraries. :func:`build_backbone` instantiates a
``configs/backbone/<name>.yaml`` (the same files method configs include through their defaults list).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from incontext.errors import InputError

__all__ = ["BACKBONE_CONFIG_DIR", "available_backbones", "backbone_config", "build_backbone"]

BACKBONE_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "backbone"


def available_backbones() -> list[str]:
    """Names of the backbone configs (``dinov2_vitl14``, ``sam_tiny``, ...)."""
    return sorted(p.stem for p in BACKBONE_CONFIG_DIR.glob("*.yaml"))


def backbone_config(name: str, **overrides: Any):
    """The ``configs/backbone/<name>.yaml`` node with ``overrides`` set (dotted keys allowed)."""
    from omegaconf import OmegaConf

    path = BACKBONE_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = available_backbones()
        near = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise InputError(f"backbone: unknown name {name!r}; {hint}available: {', '.join(names)}")
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def build_backbone(name: str, **overrides: Any) -> Any:
    """Instantiate backbone config ``name``: ``build_backbone("sam_tiny", seed=1)``,
    ``build_backbone("dinov2_vitl14", weights="/ckpt/dinov2_vitl14_pretrain.pth", device="cuda")``.

    Returns a ``DinoFeatures`` (DINOv2 configs) or a ``BatchedSamPredictor`` (SAM configs).
    """
    from hydra.utils import instantiate

    return instantiate(backbone_config(name, **overrides), _convert_="partial")
