"""Reading parity-fixture case folders the way the published pipelines read their inputs.

A case folder holds a ``case.json`` whose paths are relative to the folder (``../shared/parity/README.md``).
Helpers here turn its ``inputs`` entries into arrays:

- images: ``PIL.Image.open(f).convert("RGB")``; PIL identifies the format from the file's content, so an
  extension that does not match the content does not matter (no EXIF rotation: the published loaders apply none);
- masks: the case's ``mask_rule`` -- ``palette_index>0`` (the raw pixel values of a palette/greyscale PNG,
  foreground where > 0) or ``rgb_any>127`` (RGB, foreground where any channel > 127, for anti-aliased masks);
- augmentations (``aug``): ``hflip`` (left-right flip) and ``crop75`` (PIL crop box (W//8, H//8, W-W//8, H-H//8)),
  applied to the decoded RGB image and to the raw mask array before the mask rule.

Nothing here resizes: each method applies its own published preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from incontext.errors import InputError

__all__ = [
    "MASK_RULES",
    "CaseImage",
    "apply_augmentation",
    "apply_mask_rule",
    "case_path",
    "decode_rgb",
    "load_case_json",
    "raw_mask_array",
    "read_case_entry",
    "sha256_array",
]

MASK_RULES = ("palette_index>0", "rgb_any>127")
AUGMENTATIONS = ("hflip", "crop75")


def load_case_json(case_dir: str | Path, name: str = "case.json") -> dict[str, Any]:
    """The case's JSON settings; a clear error when the folder is not a case."""
    path = Path(case_dir) / name
    if not path.is_file():
        raise InputError(
            f"case_dir: {Path(case_dir)} has no {name}; pass a parity case folder such as "
            "../shared/parity/matcher/fss_1shot_duck"
        )
    return json.loads(path.read_text())


def case_path(case_dir: str | Path, rel: str, what: str = "file") -> Path:
    """A path from the case JSON (relative to the case folder), checked to exist."""
    p = (Path(case_dir) / rel).resolve()
    if not p.exists():
        raise InputError(f"{what}: {rel!r} (case {Path(case_dir)}) does not exist at {p}")
    return p


def decode_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, ``Image.open(path).convert("RGB")`` (format from the content, not the extension)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, ValueError) as e:
        raise InputError(f"image: cannot decode {path}: {e}") from e


def raw_mask_array(path: str | Path, rule: str) -> np.ndarray:
    """The mask file as the rule reads it: raw pixel values (palette indices / grey levels) for
    ``palette_index>0``, the (H, W, 3) RGB array for ``rgb_any>127``."""
    check_rule(rule)
    try:
        with Image.open(path) as im:
            if rule == "rgb_any>127":
                return np.asarray(im.convert("RGB")).copy()
            arr = np.asarray(im).copy()
    except (OSError, ValueError) as e:
        raise InputError(f"mask: cannot decode {path}: {e}") from e
    if arr.ndim != 2:
        raise InputError(
            f"mask: {path} has {arr.shape[2]} channels but mask_rule 'palette_index>0' needs a palette or "
            "greyscale PNG; use mask_rule 'rgb_any>127' for RGB masks"
        )
    return arr


def check_rule(rule: str) -> None:
    if rule not in MASK_RULES:
        raise InputError(f"mask_rule: {rule!r} is not known; use one of {', '.join(MASK_RULES)}")


def apply_mask_rule(raw: np.ndarray, rule: str) -> np.ndarray:
    """Raw mask array -> (H, W) bool foreground."""
    check_rule(rule)
    if rule == "rgb_any>127":
        return (np.asarray(raw) > 127).any(axis=-1)
    return np.asarray(raw) > 0


def apply_augmentation(image: np.ndarray, raw_mask: np.ndarray, aug: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Apply a case augmentation to the decoded image and the raw mask array (same geometry for both)."""
    if aug is None:
        return image, raw_mask
    if aug == "hflip":
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(raw_mask[:, ::-1])
    if aug == "crop75":
        h, w = image.shape[:2]
        # PIL crop box (left, upper, right, lower) = (W//8, H//8, W - W//8, H - H//8), always inside the image.
        box = (slice(h // 8, h - h // 8), slice(w // 8, w - w // 8))
        return np.ascontiguousarray(image[box]), np.ascontiguousarray(raw_mask[box])
    raise InputError(f"aug: {aug!r} is not known; use one of {', '.join(AUGMENTATIONS)} or null")


def sha256_array(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order (the digests stored in case.json)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@dataclass
class CaseImage:
    """One input of a case after decoding, augmentation and the mask rule.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool, or None when the entry has no mask.
        raw_mask: the raw mask array after augmentation (for digest checks), or None.
        entry: the JSON entry it came from.
    """

    image: np.ndarray
    mask: np.ndarray | None
    raw_mask: np.ndarray | None
    entry: dict[str, Any]


def read_case_entry(case_dir: str | Path, entry: dict[str, Any]) -> CaseImage:
    """Decode one ``inputs.supports[i]`` / ``inputs.query`` entry of a case JSON."""
    image = decode_rgb(case_path(case_dir, entry["image"], "image"))
    raw = None
    if entry.get("mask"):
        rule = entry.get("mask_rule", "palette_index>0")
        raw = raw_mask_array(case_path(case_dir, entry["mask"], "mask"), rule)
        if raw.shape[:2] != image.shape[:2]:
            raise InputError(
                f"mask {entry['mask']!r} is {raw.shape[1]}x{raw.shape[0]} but image {entry['image']!r} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
    aug = entry.get("aug")
    if aug is None and isinstance(entry.get("augmentation"), dict):
        aug = entry["augmentation"].get("name")
    if raw is None:
        image, _ = apply_augmentation(image, np.zeros(image.shape[:2], np.uint8), aug)
        return CaseImage(image, None, None, entry)
    image, raw = apply_augmentation(image, raw, aug)
    return CaseImage(image, apply_mask_rule(raw, entry.get("mask_rule", "palette_index>0")), raw, entry)
