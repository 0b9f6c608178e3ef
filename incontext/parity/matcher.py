"""Run a Matcher parity case end to end from its folder alone.

The case's ``case.json`` gives the inputs (decoded by :mod:`incontext.parity.common`: mask rule, augmentations,
content-sniffed image formats), the weights (``weights.dinov2``, ``weights.sam``, ``weights.arch``: always
these paths, never one built from the seed), the published settings (``hyperparameters``, the released
``main_oss.py`` names) and the episode seed. Expected arrays (``*.npz``) are never read here.

The run uses the library's Matcher (:class:`incontext.methods.matcher.Matcher`) with the case's tiny DINOv2
and SAM built by :mod:`incontext.backbones`, and writes the final mask as a 0/255 PNG at 518 x 518 (the
published output resolution).

Used by ``python -m incontext.parity matcher <case_dir> --out <mask.png>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from incontext.parity.common import case_path, load_case_json, read_case_entry

__all__ = ["MatcherCase", "build_method", "load_case", "method_kwargs", "run", "run_case"]

# case.json hyperparameter name -> Matcher argument (same names, the released main_oss.py options).
_HP_KEYS = (
    "points_per_side", "pred_iou_thresh", "sel_stability_score_thresh", "stability_score_thresh", "iou_filter",
    "box_nms_thresh", "output_layer", "dense_multimask_output", "use_dense_mask", "multimask_output",
    "num_centers", "use_box", "use_points_or_centers", "sample_range", "max_sample_iterations", "alpha", "beta",
    "exp", "emd_filter", "purity_filter", "coverage_filter", "use_score_filter", "deep_score_norm_filter",
    "deep_score_filter", "topk_scores_threshold", "num_merging_mask",
)


@dataclass
class MatcherCase:
    """A decoded case: ``supports`` [(image (H, W, 3) uint8, mask (H, W) bool)], ``query`` image, settings."""

    dir: Path
    meta: dict[str, Any]
    supports: list[tuple[np.ndarray, np.ndarray]]
    query: np.ndarray
    query_mask: np.ndarray | None


def load_case(case_dir: str | Path) -> MatcherCase:
    """Decode a case folder's inputs."""
    case_dir = Path(case_dir)
    meta = load_case_json(case_dir)
    sups = [read_case_entry(case_dir, e) for e in meta["inputs"]["supports"]]
    q = read_case_entry(case_dir, meta["inputs"]["query"])
    return MatcherCase(case_dir, meta, [(s.image, s.mask) for s in sups], q.image, q.mask)


def method_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """Matcher keyword arguments from ``case.json`` (hyperparameters as run, episode seed)."""
    hp = meta["hyperparameters"]
    kw = {k: hp[k] for k in _HP_KEYS if k in hp}
    for k in ("use_dense_mask", "multimask_output"):
        if k in kw:
            kw[k] = bool(kw[k])
    kw["sample_range"] = tuple(kw.get("sample_range", (4, 6)))
    kw["seed"] = int(meta.get("episode_seed", 0))
    return kw


def build_method(case: MatcherCase, **overrides: Any):
    """The library Matcher with the case's tiny backbones and settings."""
    from incontext.backbones.dinov2 import from_arch_json
    from incontext.backbones.sam import sam_from_config_json
    from incontext.methods.matcher import Matcher

    w = case.meta["weights"]
    arch = case_path(case.dir, w["arch"], "weights.arch")
    dinov2 = from_arch_json(arch, case_path(case.dir, w["dinov2"], "weights.dinov2"))
    sam = sam_from_config_json(arch, case_path(case.dir, w["sam"], "weights.sam"))
    kwargs = method_kwargs(case.meta)
    kwargs.update(overrides)
    return Matcher(dinov2, sam, name="matcher_parity", **kwargs)


def run_case(case_dir: str | Path, **overrides: Any):
    """Run one case; returns (:class:`MatcherRun`, the method, the decoded case)."""
    from incontext.methods.matcher import resize_image

    case = load_case(case_dir)
    method = build_method(case, **overrides)
    with torch.inference_mode():
        # Arrays rather than Support objects: Support refuses an empty mask, but the published code accepts
        # all-empty supports (its centre-square fallback lives in the patch rule).
        images, masks = _support_arrays(method, case)
        enc = method.encode_supports(images, masks)
        q518 = resize_image(case.query, method.image_size)
        out = method.run(q518, enc["tokens"], enc["fg"], shots=len(images), seed=method.seed, cache={})
    out["support_images"], out["support_masks"], out["query_518"] = images, masks, q518
    out["support_prenorm"] = enc["prenorm"]
    return out, method, case


def _support_arrays(method, case: MatcherCase) -> tuple[np.ndarray, np.ndarray]:
    from incontext.methods.matcher import resize_image, resize_mask

    images = np.stack([resize_image(img, method.image_size) for img, _ in case.supports])
    masks = np.stack([resize_mask(m, method.image_size) for _, m in case.supports])
    return images, masks


def write_mask(out: str | Path, mask: np.ndarray) -> Path:
    """Write (H, W) bool as a 0/255 greyscale PNG (atomically)."""
    from PIL import Image

    from incontext.io import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    return out


def run(case_dir: str | Path, out: str | Path | None = None) -> np.ndarray:
    """Matcher on one case; writes ``out`` (0/255 PNG, 518 x 518) and returns the (518, 518) bool mask."""
    result, _, _ = run_case(case_dir)
    mask = np.asarray(result["final_518"], dtype=bool)
    if out is not None:
        write_mask(out, mask)
    return mask
