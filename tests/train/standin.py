"""A minimal stand-in episode dataset and metric for the trainer's tests (not the project's benchmark).

Each episode: a class is a colour; the support and the query each show one rectangle of that colour (the mask)
and one distractor rectangle of another colour on a noisy background. Items are pure functions of the index.
"""

from __future__ import annotations

import numpy as np

from incontext.episode import Support
from incontext.train.data import TrainItem

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40], [200, 60, 200],
                    [40, 210, 210]], np.uint8)


def _image(rng: np.random.Generator, size: int, cls: int, other: int) -> tuple[np.ndarray, np.ndarray]:
    img = np.clip(rng.normal(110, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for colour, value in ((other, 0), (cls, 1)):
        h, w = rng.integers(size // 5, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y : y + h, x : x + w] = COLOURS[colour]
        mask[y : y + h, x : x + w] = value
    if mask.sum() == 0:  # distractor drawn over the object entirely: put a pixel back
        mask[0, 0] = 1
    return img, mask


class RectEpisodes:
    """Infinite episodes: ``episode(index) -> TrainItem``. ``offset`` separates train from held-out items."""

    def __init__(self, size: int = 32, shots: int = 1, offset: int = 0) -> None:
        self.size, self.shots, self.offset = size, shots, offset

    def episode(self, index: int) -> TrainItem:
        rng = np.random.default_rng([12345, self.offset, index])
        cls, other = rng.choice(len(COLOURS), 2, replace=False)
        q, qm = _image(rng, self.size, cls, other)
        sup = [Support.from_arrays(*_image(rng, self.size, cls, other)) for _ in range(self.shots)]
        return TrainItem(q, qm, sup)


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
