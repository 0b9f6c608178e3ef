"""Few-shot segmentation metrics: per-episode IoU, boundary IoU, and the HSNet/Matcher run-level mIoU and FB-IoU.

Protocol (HSNet, ``common/evaluation.py`` + ``common/logger.py`` of juhongm999/hsnet, reproduced here without
its class-level state or ``.cuda()``):

* every episode is binary: the query's ground truth for the episode's class vs. the prediction;
* pixels whose ground truth is ``ignore_index`` (PASCAL's 255 border) count neither for foreground nor background;
* per episode, intersection and union are computed for the two "classes" background (0) and foreground (1), and
  added to running sums **per episode class** (ΣI, ΣU);
* **mIoU** = mean over the fold's classes of ΣI_fg / max(ΣU_fg, 1), in percent. A class of the fold that received no
  episode counts as 0, as in HSNet (pass ``classes`` to get that behaviour; by default the mean is over the classes
  seen);
* **FB-IoU** = mean over {background, foreground} of (Σ over classes ΣI) / (Σ over classes ΣU), in percent, i.e.
  sums pooled over the whole run, not per class (a side whose pooled union is 0 counts 1.0, where HSNet gives NaN).

Boundary IoU follows Cheng et al., "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation" (CVPR 2021):
the boundary region of a mask is the set of its pixels within ``d`` px of its contour (image border included), with
``d = round(dilation_ratio * image diagonal)``, at least 1; boundary IoU is the IoU of the two boundary regions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from incontext.errors import InputError

__all__ = ["iou", "boundary_iou", "mask_boundary", "SegmentationMeter"]


def _as_array(x: Any, *, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise InputError(f"{name}: expected an (H,W) mask, got shape {a.shape}")
    return a


def _binary_pair(
    pred: Any, gt: Any, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred_fg, gt_fg, valid) boolean (H,W) maps; ``valid`` is False where gt == ignore_index."""
    p = _as_array(pred, name="pred")
    g = _as_array(gt, name="gt")
    if p.shape != g.shape:
        raise InputError(f"pred: shape {p.shape} differs from gt shape {g.shape}; resize the prediction to the gt")
    valid = np.ones(g.shape, dtype=bool) if ignore_index is None else g != ignore_index
    return (p != 0) & valid, (g != 0) & valid, valid


def iou(pred: Any, gt: Any, *, ignore_index: int | None = 255) -> float:
    """IoU of a binary prediction with a binary ground truth, in [0, 1].

    Args:
        pred: (H,W) mask, non-zero = foreground (numpy, bool or torch).
        gt: (H,W) mask, non-zero = foreground; pixels equal to ``ignore_index`` are left out of both.
        ignore_index: label of pixels to ignore (PASCAL border 255); None to count every pixel.

    Returns:
        |pred ∩ gt| / |pred ∪ gt|; 1.0 when both are empty (a correct "nothing here").
    """
    p, g, _ = _binary_pair(pred, gt, ignore_index)
    union = int((p | g).sum())
    return 1.0 if union == 0 else float((p & g).sum()) / union


def _boundary_width(shape: tuple[int, int], dilation_ratio: float) -> int:
    h, w = shape
    return max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))


def mask_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Pixels of ``mask`` (H,W) bool within d px (chessboard distance) of its contour, as (H,W) bool.

    ``d = max(1, round(dilation_ratio * sqrt(H^2 + W^2)))``; outside the image counts as background, so a mask that
    touches the image border has a boundary there too (as in the Boundary IoU reference implementation).
    """
    import cv2

    m = np.asarray(mask).astype(np.uint8)
    d = _boundary_width(m.shape, dilation_ratio)
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
    return (m > 0) & (eroded == 0)


def boundary_iou(pred: Any, gt: Any, dilation_ratio: float = 0.02, *, ignore_index: int | None = 255) -> float:
    """Boundary IoU (Cheng et al. 2021) of two binary (H,W) masks, in [0, 1]; 1.0 when both are empty.

    Pixels where ``gt == ignore_index`` are removed from both masks first, then from both boundary regions.
    """
    p, g, valid = _binary_pair(pred, gt, ignore_index)
    pb = mask_boundary(p, dilation_ratio) & valid
    gb = mask_boundary(g, dilation_ratio) & valid
    union = int((pb | gb).sum())
    return 1.0 if union == 0 else float((pb & gb).sum()) / union


class SegmentationMeter:
    """Accumulates the HSNet/Matcher few-shot protocol over a run (see the module docstring).

    Args:
        classes: the fold's class ids. If given, mIoU averages over exactly these (a class without episodes counts
            0, as in HSNet) and updates with another class id raise. If None, it averages over the classes seen.
        ignore_index: ground-truth label excluded from every count (PASCAL's 255); None to count every pixel.
        boundary: also compute boundary IoU per episode (mean reported in ``summary()``).
        dilation_ratio: boundary width as a fraction of the image diagonal (Boundary IoU paper default 0.02).

    Example::

        meter = SegmentationMeter()
        for ep in episodes:
            meter.update(pred_mask, gt_mask, ep.class_id)
        meter.summary()  # {"miou": 61.2, "fbiou": 75.3, "per_class": {...}, "boundary_iou": ..., "episodes": n}
    """

    def __init__(
        self,
        classes: Iterable[int] | None = None,
        *,
        ignore_index: int | None = 255,
        boundary: bool = True,
        dilation_ratio: float = 0.02,
    ) -> None:
        self.classes = None if classes is None else sorted(int(c) for c in classes)
        self.ignore_index = ignore_index
        self.boundary = boundary
        self.dilation_ratio = dilation_ratio
        # per class id: [background, foreground] running sums, as HSNet's (2, nclass) buffers
        self.intersection: dict[int, np.ndarray] = {}
        self.union: dict[int, np.ndarray] = {}
        self.episode_ious: list[float] = []
        self.boundary_ious: list[float] = []

    def update(self, pred: Any, gt: Any, class_id: int) -> float:
        """Add one binary episode: ``pred`` (H,W) non-zero = foreground, ``gt`` (H,W) 0/1 (+ ``ignore_index``).

        Returns:
            this episode's foreground IoU in [0, 1] (1.0 for empty vs empty).
        """
        class_id = int(class_id)
        if self.classes is not None and class_id not in self.classes:
            raise InputError(
                f"class_id: {class_id} is not one of the meter's classes {self.classes}; pass classes=None to "
                f"accept any"
            )
        p, g, valid = _binary_pair(pred, gt, self.ignore_index)
        pb, gb = ~p & valid, ~g & valid  # background, restricted to counted pixels
        inter = np.array([(pb & gb).sum(), (p & g).sum()], dtype=np.float64)
        union = np.array([(pb | gb).sum(), (p | g).sum()], dtype=np.float64)
        self.intersection[class_id] = self.intersection.get(class_id, np.zeros(2)) + inter
        self.union[class_id] = self.union.get(class_id, np.zeros(2)) + union
        ep = 1.0 if union[1] == 0 else inter[1] / union[1]
        self.episode_ious.append(float(ep))
        if self.boundary:
            self.boundary_ious.append(boundary_iou(pred, gt, self.dilation_ratio, ignore_index=self.ignore_index))
        return float(ep)

    def update_labels(self, pred: Any, gt: Any, classes: Iterable[int] | None = None) -> None:
        """Add a multi-class episode as one binary episode per class (``pred == c`` vs ``gt == c``).

        Args:
            pred, gt: (H,W) label maps (0 = background). ``gt == ignore_index`` stays ignored for every class.
            classes: the episode's classes; default: the labels present in ``gt`` (other than 0 / ignore).
        """
        g = _as_array(gt, name="gt")
        p = _as_array(pred, name="pred")
        if classes is None:
            classes = [int(c) for c in np.unique(g) if c != 0 and c != self.ignore_index]
        for c in classes:
            gc = (g == c).astype(np.int64)
            if self.ignore_index is not None:
                gc[g == self.ignore_index] = self.ignore_index
            self.update(p == c, gc, c)

    def summary(self) -> dict[str, Any]:
        """Run-level figures, in percent (0-100).

        Returns:
            ``miou``: mean over classes of ΣI_fg/ΣU_fg; ``fbiou``: mean of pooled background and foreground IoU;
            ``per_class``: {class_id: IoU}; ``boundary_iou``: mean per-episode boundary IoU (None if disabled);
            ``mean_episode_iou``: plain mean of per-episode IoUs; ``episodes``: number of updates.
            With no episode, the IoU figures are NaN.
        """
        nan = float("nan")
        classes = self.classes if self.classes is not None else sorted(self.intersection)
        per_class = {}
        for c in classes:
            inter = self.intersection.get(c, np.zeros(2))
            union = self.union.get(c, np.zeros(2))
            per_class[c] = 100.0 * float(inter[1] / max(union[1], 1.0))
        if self.intersection:
            tot_i = sum(self.intersection.get(c, np.zeros(2)) for c in classes)
            tot_u = sum(self.union.get(c, np.zeros(2)) for c in classes)
            fb = [float(i / u) if u > 0 else 1.0 for i, u in zip(tot_i, tot_u)]  # an empty run side is perfect
            fbiou = 100.0 * float(np.mean(fb))
        else:
            fbiou = nan
        return {
            "miou": float(np.mean(list(per_class.values()))) if per_class and self.intersection else nan,
            "fbiou": fbiou,
            "per_class": per_class,
            "boundary_iou": (100.0 * float(np.mean(self.boundary_ious)) if self.boundary_ious else nan)
            if self.boundary
            else None,
            "mean_episode_iou": 100.0 * float(np.mean(self.episode_ious)) if self.episode_ious else nan,
            "episodes": len(self.episode_ious),
        }
