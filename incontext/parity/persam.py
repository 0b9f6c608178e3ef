"""Run a PerSAM / PerSAM-F parity case end to end from its folder alone.

A case folder (``../shared/parity/README.md`` section 2) holds ``meta.json`` (paths relative to the
folder, the mask rule, the PerSAM-F iteration count and learning rate, the model files) and
``inputs/``. Expected arrays (``*.npz``) are never read here: the runner reproduces what the
published scripts did with the same inputs,

- images decoded like ``cv2.imread`` + BGR->RGB (the published code's reader; OpenCV looks at the
  content, so a mismatched extension does not matter);
- the reference mask turned into the red channel the published code saw, following
  ``inputs.mask_rule``: PerSeg palette PNGs are read as RGB and keep their red channel (foreground
  128); RGB masks from other sources are binarised ("any channel > 127") and painted (128, 0, 0) as
  the fixture generator did;

and runs the library's ``persam`` / ``persam_f`` methods (``incontext.methods.persam``) with the
case's tiny SAM (built by ``incontext.backbones.sam.sam_from_config_json``). The final mask is
written as a 0/255 PNG at the query's size.

Used by ``python -m incontext.parity persam|persam_f <case_dir> --out <mask.png>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from incontext.errors import InputError
from incontext.parity.common import MASK_RULES, apply_mask_rule, case_path, raw_mask_array

__all__ = [
    "PerSamCase",
    "load_case",
    "read_rgb",
    "reference_red_channel",
    "run_persam",
    "run_persam_f",
]

# Red value the published pipeline saw for foreground (PerSeg palette colour (128, 0, 0)); the
# fixture generator paints binarised RGB masks with it too (parity README section 2.1).
PERSEG_RED = 128


@dataclass
class PerSamCase:
    """Inputs of one case, decoded the way the published code decodes them.

    Attributes:
        dir: the case folder.
        meta: ``meta.json``.
        ref_image, query_image: (H, W, 3) uint8 RGB.
        ref_red: (H, W) uint8 red channel of the reference mask as the published code saw it.
        model_config, model_weights: paths of the tiny SAM description and weights.
        train_iterations, lr: PerSAM-F fit settings of the run.
    """

    dir: Path
    meta: dict[str, Any]
    ref_image: np.ndarray
    query_image: np.ndarray
    ref_red: np.ndarray
    model_config: Path
    model_weights: Path | None
    train_iterations: int
    lr: float


def read_rgb(path: Path, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB like the published ``cv2.imread(path)`` + ``cv2.cvtColor(BGR2RGB)``."""
    import cv2

    if not Path(path).is_file():
        raise InputError(
            f"{name}: no file at {path}; the case folder must contain the paths meta.json names"
        )
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(
            f"{name}: OpenCV cannot decode {path}; the file is not an image it can read"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def reference_red_channel(path: Path, rule: str) -> np.ndarray:
    """(H, W) uint8 red channel of the reference mask that the published code saw.

    Args:
        path: the mask file as given in the case.
        rule: ``meta.json -> inputs.mask_rule``. The shared tokens of ``incontext.parity.common``
            (``palette_index>0``, ``rgb_any>127``) are applied as there; free-text rules naming "any
            channel > t" or a binarisation (RGB masks, possibly anti-aliased) binarise with that
            threshold (default 127); in both cases foreground is painted 128 like the fixture
            generator did. Anything else (PerSeg: "cv2.imread -> RGB, red channel > 0") keeps the
            decoded red channel as it is.
    """
    text = rule.strip().lower()
    if text in MASK_RULES:
        fg = apply_mask_rule(raw_mask_array(path, text), text)
        return fg.astype(np.uint8) * np.uint8(PERSEG_RED)
    if re.search(r"any channel|binari[sz]|>\s*127", text):
        found = re.search(r">\s*(\d+)", text)
        threshold = int(found.group(1)) if found else 127
        fg = (read_rgb(path, "reference mask") > threshold).any(axis=-1)
        return fg.astype(np.uint8) * np.uint8(PERSEG_RED)
    return read_rgb(path, "reference mask")[..., 0].copy()


def _entry(meta: dict[str, Any], key: str) -> str:
    inputs = meta.get("inputs", {})
    item = inputs.get(key)
    if isinstance(item, dict) and "file" in item:
        return item["file"]
    if isinstance(meta.get(key), str):
        return meta[key]
    raise InputError(f"meta.json: no path for {key!r} (looked at inputs.{key}.file and {key})")


def load_case(case_dir: str | Path) -> PerSamCase:
    """Read ``meta.json`` and decode the case's inputs (see the module docstring)."""
    d = Path(case_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"case_dir: no meta.json in {d}; pass a PerSAM parity case folder")
    meta = json.loads(meta_path.read_text())
    rule = (
        meta.get("inputs", {}).get("mask_rule")
        or meta.get("ref_mask_encoding")
        or "red channel > 0"
    )
    ref_image = read_rgb(
        case_path(d, _entry(meta, "ref_image"), "reference image"), "reference image"
    )
    query = read_rgb(case_path(d, _entry(meta, "test_image"), "query image"), "query image")
    red = reference_red_channel(case_path(d, _entry(meta, "ref_mask"), "reference mask"), rule)
    if red.shape != ref_image.shape[:2]:
        raise InputError(
            f"reference mask: {red.shape[1]}x{red.shape[0]} but its image is "
            f"{ref_image.shape[1]}x{ref_image.shape[0]}; the published code needs them equal"
        )
    model_dir = meta.get("model_dir", "../model")
    config = case_path(
        d, meta.get("model_config") or f"{model_dir}/model_config.json", "model_config"
    )
    weights = (
        case_path(d, meta["model_weights"], "model_weights") if meta.get("model_weights") else None
    )
    args = meta.get("persam_f_args", {})
    return PerSamCase(
        dir=d,
        meta=meta,
        ref_image=ref_image,
        query_image=query,
        ref_red=red,
        model_config=config,
        model_weights=weights,
        train_iterations=int(args.get("train_epoch", 1000)),
        lr=float(args.get("lr", 1e-3)),
    )


def _predictor(case: PerSamCase):
    from incontext.backbones.sam import sam_from_config_json

    default = case.model_config.parent / "weights.safetensors"
    weights = (
        None
        if case.model_weights is None or case.model_weights.resolve() == default.resolve()
        else case.model_weights
    )
    return sam_from_config_json(case.model_config, weights)


def _write(out: str | Path, mask: np.ndarray) -> Path:
    from PIL import Image

    from incontext.io import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    return out


def _run(method, case: PerSamCase, out: str | Path | None) -> np.ndarray:
    import torch

    with torch.inference_mode():
        state = method.prepare_references([(case.ref_image, case.ref_red)])
        result = method.segment_binary(case.query_image, state, cache={})
    if out is not None:
        _write(out, result.mask)
    return result.mask


def run_persam(case_dir: str | Path, out: str | Path | None = None) -> np.ndarray:
    """PerSAM (``persam.py``) on one case: writes ``out`` (0/255 PNG), returns the bool mask."""
    from incontext.methods.persam import PerSAM

    case = load_case(case_dir)
    return _run(PerSAM(_predictor(case)), case, out)


def run_persam_f(case_dir: str | Path, out: str | Path | None = None) -> np.ndarray:
    """PerSAM-F (``persam_f.py``, the case's iterations and lr): writes ``out``, returns it."""
    from incontext.methods.persam import PerSAMF

    case = load_case(case_dir)
    method = PerSAMF(_predictor(case), iterations=case.train_iterations, lr=case.lr)
    return _run(method, case, out)
