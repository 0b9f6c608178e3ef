"""The common interface of every few-shot benchmark: a fixed, seeded list of episodes with their answers.

Protocol (as HSNet tests, made independent of worker count and order): episode ``index`` of a benchmark is a
pure function of ``(seed, split key, index)``. Every random draw comes from its own generator

    np.random.default_rng([seed, crc32(split key), index, stream, ...])

with separate streams for the query (0), the supports (1, then one sub-stream per class slot and shot) and the
shuffled-support control (2). So the first support of a 5-shot episode is the support of the 1-shot episode with
the same index, and ``supports="shuffled"`` keeps every query and only swaps the supports' class.

Subclasses implement three small hooks (``_query``, ``_supports``, ``class_names``); the base class handles the
shuffled control, bounds checks and iteration.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from incontext.episode import Episode, Support
from incontext.errors import InputError

SUPPORT_MODES = ("matched", "shuffled")
IGNORE = 255  # label of pixels excluded from the metrics (PASCAL's object borders)

STREAM_QUERY, STREAM_SUPPORT, STREAM_SHUFFLE = 0, 1, 2


def split_key(text: str) -> int:
    """A stable 32-bit integer for a split/fold name (part of every episode's seed)."""
    return zlib.crc32(text.encode("utf-8"))


def episode_rng(seed: int, key: int, index: int, *stream: int) -> np.random.Generator:
    """The generator of one draw of episode ``index`` (see the module docstring)."""
    return np.random.default_rng([int(seed), int(key), int(index), *map(int, stream)])


@dataclass
class InstanceGT:
    """One object of a query's ground truth.

    Attributes:
        mask: (H, W) bool visible pixels.
        class_id: the benchmark's class id (-1 for unlabelled clutter).
        label: its label in the episode's target map (0 = not a target).
        role: "target", "distractor" or "clutter".
    """

    mask: np.ndarray
    class_id: int
    label: int
    role: str


@dataclass
class QueryDraw:
    """What ``_query`` returns: the query image, its target label map and the episode's classes."""

    image: np.ndarray
    target: np.ndarray
    classes: list[int]
    name: str | None = None
    instances: list[InstanceGT] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpisodeSample:
    """One evaluation (or training) episode with its answer.

    Attributes:
        episode: the ``Episode`` (query (H, W, 3) uint8; supports with label masks, label i + 1 marking
            ``support_classes[i]``).
        target: (H, W) uint8 label map of the query at its original size: 0 background, i + 1 for
            ``classes[i]``, 255 ignored by the metrics.
        classes: benchmark class ids of the episode's labels 1..N.
        class_names: their names.
        support_classes: the classes the supports show (equal to ``classes`` unless supports are shuffled).
        index: the episode's index in its benchmark.
        instances: per-object ground truth when the benchmark knows it (synthetic).
        meta: names of the files used, etc.
    """

    episode: Episode
    target: np.ndarray
    classes: list[int]
    class_names: list[str]
    support_classes: list[int]
    index: int
    instances: list[InstanceGT] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def query_mask(self) -> np.ndarray:
        """Alias of ``target`` (the name the training code reads)."""
        return self.target


class EpisodeBenchmark:
    """A fixed list of seeded episodes. ``len(b)`` episodes; ``b[i]`` / ``b.episode(i)`` builds episode i.

    Args:
        shots: supports per class.
        episodes: how many episodes the list holds (None: the benchmark's protocol count).
        seed: the evaluation seed (HSNet tests with 0).
        supports: "matched" (supports show the query's class) or "shuffled" (each class slot's supports are
            drawn from another class: the control that shows a method uses its supports).
    """

    name = "benchmark"
    default_episodes = 1000

    def __init__(self, shots: int = 1, episodes: int | None = None, seed: int = 0,
                 supports: str = "matched") -> None:
        if int(shots) < 1:
            raise InputError(f"shots: {shots!r}; pass shots=1 or more")
        if supports not in SUPPORT_MODES:
            raise InputError(f"supports: {supports!r}; pass one of {', '.join(SUPPORT_MODES)}")
        n = self.default_episodes if episodes is None else int(episodes)
        if n < 1:
            raise InputError(f"episodes: {episodes!r}; pass episodes=1 or more")
        self.shots = int(shots)
        self.episodes = n
        self.seed = int(seed)
        self.supports = supports

    # ------------------------------------------------------------------ hooks
    @property
    def key(self) -> int:
        """This split/fold's part of every episode seed."""
        return split_key(self.name)

    @property
    def class_ids(self) -> list[int]:
        """The classes episodes are drawn from (also the pool for shuffled supports)."""
        raise NotImplementedError

    def class_name(self, class_id: int) -> str:
        raise NotImplementedError

    def _query(self, index: int, rng: np.random.Generator) -> QueryDraw:
        """The query of episode ``index`` (classes, image, target)."""
        raise NotImplementedError

    def _supports(self, index: int, classes: Sequence[int], exclude: QueryDraw) -> list[Support]:
        """``shots`` supports for each class slot (label i + 1 for ``classes[i]``), never the query itself.
        Draw slot i, shot j from ``self.support_rng(index, i, j)`` (or ``self.support_rng(index, i)``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ API
    def support_rng(self, index: int, *sub: int) -> np.random.Generator:
        return episode_rng(self.seed, self.key, index, STREAM_SUPPORT, *sub)

    def __len__(self) -> int:
        return self.episodes

    def __getitem__(self, index: int) -> EpisodeSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"episode {index} of a benchmark with {len(self)} episodes")
        return self.episode(index % len(self))

    def __iter__(self) -> Iterator[EpisodeSample]:
        for i in range(len(self)):
            yield self.episode(i)

    def shuffled_classes(self, index: int, classes: Sequence[int]) -> list[int]:
        """For the shuffled control: each class slot replaced by a different class of the pool (seeded)."""
        pool = [c for c in self.class_ids if c not in set(classes)]
        if len(pool) < len(classes):
            raise InputError(f"supports=shuffled: benchmark {self.name} has too few classes to shuffle")
        rng = episode_rng(self.seed, self.key, index, STREAM_SHUFFLE)
        return [int(pool[i]) for i in rng.choice(len(pool), len(classes), replace=False)]

    def episode(self, index: int) -> EpisodeSample:
        """Episode ``index`` (any integer >= 0: the list wraps for training streams)."""
        if index < 0:
            raise IndexError(f"episode index {index}; pass 0 or more")
        q = self._query(index, episode_rng(self.seed, self.key, index, STREAM_QUERY))
        support_classes = list(q.classes)
        if self.supports == "shuffled":
            support_classes = self.shuffled_classes(index, q.classes)
        supports = self._supports(index, support_classes, q)
        ep = Episode(q.image, supports)
        return EpisodeSample(
            episode=ep,
            target=q.target,
            classes=[int(c) for c in q.classes],
            class_names=[self.class_name(c) for c in q.classes],
            support_classes=support_classes,
            index=index,
            instances=q.instances,
            meta={"query": q.name, **q.meta, "supports": [s.name for s in supports]},
        )
