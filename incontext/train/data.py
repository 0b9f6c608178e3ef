"""Training data indexed by step: every item is a pure function of (seed, index), never of a consumed iterator.

Global item index for step s, micro-step m (of ``accum``), rank r (of ``world``), position i (of ``batch``):

    index = ((s * accum + m) * world + r) * batch + i

so ranks get disjoint items (the distributed sampler), a run resumed at step s draws exactly the items an
uninterrupted run would, and 2 ranks x batch b see the same items as 1 rank x batch 2b. Each item's own
randomness (colours, masks, flips) comes from ``np.random.default_rng([seed, index])``, so it does not depend on
the number of DataLoader workers either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from incontext.episode import Support

__all__ = ["TrainItem", "as_train_item", "EpisodeSource", "as_source", "IndexedSamples", "StepBatchSampler", "ClassSubset",
           "stack"]


@dataclass
class TrainItem:
    """One training episode with its answer.

    Attributes:
        query: (H, W, 3) uint8.
        query_mask: (H, W) uint8 label map of the query, same labels as the supports' masks.
        supports: the examples (``Support`` with (H_i, W_i) label masks).
        decoys: examples of *other* classes (``incontext.data.curriculum.DecoyEpisodes``), for tasks that teach a
            model to tell a misleading cue from the real prompt; empty for ordinary episodes.
    """

    query: np.ndarray
    query_mask: np.ndarray
    supports: list[Support]
    decoys: list[Support] = field(default_factory=list)


def _support(s: Any) -> Support:
    if isinstance(s, Support):
        return s
    if isinstance(s, dict):
        return Support.from_arrays(np.asarray(s["image"]), np.asarray(s["mask"]))
    image, mask = s
    return Support.from_arrays(np.asarray(image), np.asarray(mask))


def as_train_item(x: Any) -> TrainItem:
    """Accept the shapes episode datasets return: ``TrainItem``; an object or dict with ``query``,
    ``query_mask`` (or ``target`` / ``mask``) and ``supports``; an object with ``episode`` + ``query_mask``;
    or a pair (Episode, query_mask)."""
    if isinstance(x, TrainItem):
        return x
    if isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "supports"):
        ep, qm = x
        return TrainItem(np.asarray(ep.query), np.asarray(qm), [_support(s) for s in ep.supports])
    get = (lambda k: x.get(k)) if isinstance(x, dict) else (lambda k: getattr(x, k, None))
    ep = get("episode")
    query = get("query") if ep is None else ep.query
    supports = get("supports") if ep is None else ep.supports
    qmask = next((v for v in (get("query_mask"), get("target"), get("mask")) if v is not None), None)
    if query is None or qmask is None or supports is None:
        raise TypeError(
            f"training data: cannot read a query, its mask and supports from {type(x).__name__}; "
            "return TrainItem(query, query_mask, supports) or (Episode, query_mask)"
        )
    return TrainItem(np.asarray(query), np.asarray(qmask), [_support(s) for s in supports])


class EpisodeSource:
    """Item ``index`` of an episode dataset, for any integer index >= 0.

    Wraps a procedural generator (a callable ``f(index)`` or an object with ``episode(index)``), which is
    already infinite, or a finite sequence, which is walked in a fresh permutation each pass (seeded by
    (seed, pass)) so any index is defined.
    """

    def __init__(self, data: Any, seed: int = 0) -> None:
        self.seed = int(seed)
        self._fn: Callable[[int], Any] | None = None
        self._seq: Sequence | None = None
        if hasattr(data, "episode") and callable(data.episode):
            self._fn = data.episode
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            if len(data) == 0:
                raise ValueError("training data: the episode dataset is empty")
            self._seq = data
        elif callable(data):
            self._fn = data
        else:
            raise TypeError(
                f"training data: {type(data).__name__} is neither indexable nor a callable index -> episode"
            )
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def __getitem__(self, index: int) -> TrainItem:
        if self._fn is not None:
            return as_train_item(self._fn(int(index)))
        n = len(self._seq)
        epoch, pos = divmod(int(index), n)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return as_train_item(self._seq[int(self._perm_cache[1][pos])])


def as_source(data: Any, seed: int = 0) -> EpisodeSource:
    return data if isinstance(data, EpisodeSource) else EpisodeSource(data, seed)


class IndexedSamples(torch.utils.data.Dataset):
    """Map-style dataset: index -> ``task.make_sample(source[index], rng(seed, index))``."""

    def __init__(self, source: EpisodeSource, make_sample: Callable, seed: int) -> None:
        self.source = source
        self.make_sample = make_sample
        self.seed = int(seed)

    def __len__(self) -> int:  # only for DataLoader's bookkeeping; indices come from the batch sampler
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        return self.make_sample(self.source[int(index)], rng)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the index lists of micro-batches from ``start_step`` on (see the module docstring)."""

    def __init__(self, start_step: int, batch: int, accum: int = 1, world: int = 1, rank: int = 0,
                 max_steps: int | None = None) -> None:
        self.start_step, self.batch, self.accum = int(start_step), int(batch), int(accum)
        self.world, self.rank = int(world), int(rank)
        self.max_steps = max_steps

    def indices(self, step: int, micro: int) -> list[int]:
        base = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        return list(range(base, base + self.batch))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            for m in range(self.accum):
                yield self.indices(step, m)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            return 2**62
        return max(0, self.max_steps - self.start_step) * self.accum


def stack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate dict samples by stacking each key."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class ClassSubset:
    """The episodes of a benchmark whose classes all lie in a subset: item i is the i-th such episode.

    For short sanity runs ("does it learn on a few classes?") and class-restricted evaluation. Works with any
    benchmark exposing ``class_ids``, ``episode_classes(index)`` (cheap: no rendering) and ``episode(index)``,
    as ``incontext.data.synthetic.SyntheticBenchmark`` does.

    Args:
        bench: the benchmark.
        classes: class ids to keep, or an int n for the first n of ``bench.class_ids``.
        episodes: ``len()`` for evaluation use (indexing past it still works, for training streams).
    """

    def __init__(self, bench: Any, classes: int | Sequence[int], episodes: int = 1000) -> None:
        ids = list(bench.class_ids)
        self.classes = set(ids[: int(classes)] if isinstance(classes, int) else map(int, classes))
        if not self.classes:
            raise ValueError("ClassSubset: no classes selected")
        self.bench = bench
        self.episodes = int(episodes)
        self._map: list[int] = []
        self._scan = 0
        self._limit = 1000 * len(ids)  # every class appears once per pass of ``len(ids)`` indices

    def _index(self, i: int) -> int:
        while len(self._map) <= i:
            if self._scan > self._limit * (len(self._map) + 1):
                raise ValueError("ClassSubset: the selected classes never occur in this benchmark")
            if set(self.bench.episode_classes(self._scan)) <= self.classes:
                self._map.append(self._scan)
            self._scan += 1
        return self._map[i]

    def episode(self, index: int) -> Any:
        return self.bench.episode(self._index(int(index)))

    def __len__(self) -> int:
        return self.episodes

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.episodes:
            raise IndexError(f"episode {index} of a subset with {self.episodes} episodes")
        return self.episode(index)

    def __iter__(self):
        for i in range(self.episodes):
            yield self.episode(i)
