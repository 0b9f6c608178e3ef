"""A minimal stand-in episode dataset and metric for the trainer's tests (not the project's benchmark); the
episodes are ``incontext.data.curriculum.RectEpisodes``.

Each episode: a class is a colour; the support and the query each show one rectangle of that colour (the mask)
and one distractor rectangle of another colour on a noisy background. Items are pure functions of the index.
"""

from __future__ import annotations

import numpy as np

from incontext.data.curriculum import RectEpisodes
from incontext.train.data import TrainItem

__all__ = ["RectEpisodes", "held_out", "mean_iou", "evaluator"]


def held_out(n: int = 4, size: int = 32, shots: int = 1) -> list[TrainItem]:
    src = RectEpisodes(size, shots, offset=1)
    return [src.episode(i) for i in range(n)]


def mean_iou(segmenter, items: list[TrainItem]) -> dict[str, float]:
    """Foreground IoU averaged over items (stand-in for incontext.evaluate in these tests)."""
    ious = []
    for it in items:
        pred = segmenter.segment(it.query, [(s.image, s.mask) for s in it.supports]).mask > 0
        gt = it.query_mask > 0
        union = (pred | gt).sum()
        ious.append(float((pred & gt).sum() / union) if union else 1.0)
    return {"miou": float(np.mean(ious))}


def evaluator():
    return mean_iou
