"""Training-episode sources for curricula: episodes where only the prompt names the target, and a schedule that
moves from one source to another.

All are index-pure (item ``i`` is a function of (seed, i) only), as ``incontext.train.data`` requires, so
resumed and multi-worker runs see the same items. ``i`` is the global item index (step x batch + position), so
schedules are written in items.

* ``RectEpisodes``: flat-colour rectangles on noise; the query shows the support's colour and one other
  colour, so only a model that reads its prompt can score. The stand-in on which the tiny painter provably
  learns to read its prompt in a few hundred steps.
* ``RivalEpisodes``: procedural-benchmark scenes whose query shows the target class *and* a rival class drawn
  from the same class pool (labelled background); the support shows the target only. The pool grows from a few
  classes to the whole split, so memorising classes never answers "which one?" — the prompt does.
* ``DecoyEpisodes``: another source's items with a *decoy* support of another class attached (a fresh
  episode of the same source), for tasks that must learn not to trust a cue computed from the wrong example.
* ``Curriculum``: item ``i`` comes from ``first`` with a probability that falls linearly from ``p_start`` to
  ``p_end`` over ``ramp_items`` items, else from ``second``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from incontext.episode import Support
from incontext.train.data import TrainItem, as_source

__all__ = ["RECT_COLOURS", "RectEpisodes", "RivalEpisodes", "DecoyEpisodes", "Curriculum"]

RECT_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 210, 40], [200, 60, 200],
                         [40, 210, 210]], np.uint8)


def _rect_image(rng: np.random.Generator, size: int, cls: int, other: int) -> tuple[np.ndarray, np.ndarray]:
    img = np.clip(rng.normal(110, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for colour, value in ((other, 0), (cls, 1)):
        h, w = rng.integers(size // 5, size // 2, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y : y + h, x : x + w] = RECT_COLOURS[colour]
        mask[y : y + h, x : x + w] = value
    if mask.sum() == 0:  # distractor drawn over the object entirely: put a pixel back
        mask[0, 0] = 1
    return img, mask


class RectEpisodes:
    """Infinite rectangle episodes: ``episode(index) -> TrainItem``.

    Args:
        size: image side in pixels.
        shots: supports per episode.
        offset: separates streams (e.g. train 0, held-out 1).
    """

    def __init__(self, size: int = 32, shots: int = 1, offset: int = 0) -> None:
        self.size, self.shots, self.offset = int(size), int(shots), int(offset)

    def episode(self, index: int) -> TrainItem:
        rng = np.random.default_rng([12345, self.offset, int(index)])
        cls, other = rng.choice(len(RECT_COLOURS), 2, replace=False)
        q, qm = _rect_image(rng, self.size, cls, other)
        sup = [Support.from_arrays(*_rect_image(rng, self.size, cls, other)) for _ in range(self.shots)]
        return TrainItem(q, qm, sup)


class RivalEpisodes:
    """Procedural-benchmark training episodes in which the query also shows a rival class of the same pool.

    Item ``i``: the pool is the first n(i) classes of a seeded permutation of the split's classes, n(i) growing
    linearly (in log space) from ``classes_start`` to all of them over ``ramp_items`` items; the target a and the
    rival b are two distinct pool classes. The query scene shows a (label 1) and b (rendered as a target, then
    relabelled background) plus the benchmark's usual distractors and clutter; the support scene shows a and
    excludes b. With probability ``p_plain`` the item is instead an ordinary 1-way episode of the pool (no rival).

    Args:
        split, size, seed: as ``SyntheticBenchmark``.
        classes_start: pool size at item 0.
        ramp_items: items over which the pool grows to the whole split (0 = whole split from the start).
        p_plain: probability of an episode without a rival.
        shots: supports per episode.
    """

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, classes_start: int = 8,
                 ramp_items: int = 0, p_plain: float = 0.0, shots: int = 1) -> None:
        from incontext.data.synthetic import SceneRenderer

        self.renderer = SceneRenderer(split, size)
        self.seed, self.shots = int(seed), int(shots)
        self.ids = [c.id for c in self.renderer.classes]
        self.order = np.random.default_rng([self.seed, 777]).permutation(len(self.ids))
        self.classes_start = max(2, min(int(classes_start), len(self.ids)))
        self.ramp_items, self.p_plain = int(ramp_items), float(p_plain)

    def pool_size(self, index: int) -> int:
        """n(i): classes the target and rival are drawn from at item ``index``."""
        n_all = len(self.ids)
        if self.ramp_items <= 0 or index >= self.ramp_items:
            return n_all
        t = index / self.ramp_items
        return int(round(np.exp((1 - t) * np.log(self.classes_start) + t * np.log(n_all))))

    def episode(self, index: int) -> TrainItem:
        rng = np.random.default_rng([self.seed, 31337, int(index)])
        pool = self.order[: self.pool_size(int(index))]
        a, b = (self.ids[int(k)] for k in rng.choice(pool, 2, replace=False))
        rival = rng.random() >= self.p_plain
        targets = [a, b] if rival else [a]
        q = self.renderer.scene(rng, targets, max_per_class=2 if rival else 3)
        query_mask = (q.labels == 1).astype(np.uint8)
        sup = []
        for _ in range(self.shots):
            s = self.renderer.scene(rng, [a], exclude=[b])
            sup.append(Support.from_arrays(s.image, (s.labels > 0).astype(np.uint8)))
        return TrainItem(q.image, query_mask, sup)


class DecoyEpisodes:
    """Item ``i`` of ``source`` with ``decoys`` = the supports of item ``i + offset`` of the same source.

    With the procedural benchmark's 960 train classes the decoy is another class in all but ~0.1 % of items;
    the rare same-class decoy is left as it is (a hint that happens to be right), so no item is rejected and
    the source stays index-pure.

    Args:
        source: episode source (anything ``incontext.train.data.as_source`` accepts) whose indices past its
            length give fresh episodes (``SyntheticBenchmark`` does).
        offset: index distance to the decoy's episode (large, so decoys never repeat the stream's items).
        seed: seeds ``as_source`` for sequence sources.
    """

    def __init__(self, source: Any, offset: int = 1_000_003, seed: int = 0) -> None:
        self.source, self.offset = as_source(source, seed), int(offset)

    def episode(self, index: int) -> TrainItem:
        item = self.source[int(index)]
        decoy = self.source[int(index) + self.offset]
        return TrainItem(item.query, item.query_mask, item.supports, list(decoy.supports))


class Curriculum:
    """Item ``i`` from ``first`` with probability p(i), else from ``second`` (both indexed by ``i``).

    p(i) falls linearly from ``p_start`` at item 0 to ``p_end`` at item ``ramp_items`` and stays there.

    Args:
        first, second: episode sources (anything ``incontext.train.data.as_source`` accepts).
        p_start, p_end: probabilities of ``first`` at the start and after the ramp.
        ramp_items: length of the ramp in items (step x batch size).
        seed: seeds the per-item choice.
    """

    def __init__(self, first: Any, second: Any, p_start: float = 1.0, p_end: float = 0.0,
                 ramp_items: int = 8000, seed: int = 0) -> None:
        self.first, self.second = as_source(first, seed), as_source(second, seed)
        self.p_start, self.p_end = float(p_start), float(p_end)
        self.ramp_items, self.seed = max(1, int(ramp_items)), int(seed)

    def p_first(self, index: int) -> float:
        t = min(1.0, index / self.ramp_items)
        return (1 - t) * self.p_start + t * self.p_end

    def episode(self, index: int) -> TrainItem:
        u = np.random.default_rng([self.seed, 4242, int(index)]).random()
        return (self.first if u < self.p_first(int(index)) else self.second)[int(index)]
