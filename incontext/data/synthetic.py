"""A procedural few-shot segmentation benchmark: 1,200 classes, any resolution, deterministic from a seed.

**Classes.** A class is a shape (``shapes.SHAPES``, 40 in 7 families) painted with an appearance = a pattern
(``textures.PATTERNS``, 20) in a colour scheme (``textures.SCHEMES``, 12): 240 appearances, each carried by 5
different shapes, so 1,200 classes. The split is by appearance, like novel classes: appearance (p, s) is a test
appearance iff ``(p + 3 s) % 5 == 0`` (48 appearances, 240 test classes; 192 appearances, 960 train classes).
Every pattern and every colour scheme occurs in both splits, only their combinations are new; each shape carries
exactly 6 test classes and 24 train classes (shapes are dealt in blocks of 8 appearances x 5 = 40). The table is
a fixed function of ``TABLE_SEED`` and is committed as ``splits/synthetic/classes.tsv`` (a test checks both
agree).

**Images.** A background mosaic of 4-8 warped Voronoi regions, each textured from the same pattern families and
palette as the objects (continuous random parameters); 1-3 instances of each target class; 1-4 distractor
instances of *other classes of the same split*, in groups of 1-3 like the targets; 3-5 clutter objects
(combinations of the same shape, pattern and colour-scheme lists that are no class of the table, unlabelled). Distractor groups are chosen relative to a target class: a shape
twin (same shape, another appearance, p=0.3), an appearance twin (same pattern and colours, another shape,
p=0.3), a colour twin (same colours, another pattern and shape, 0.15), a pattern twin (0.1) or any class (0.15).
Every object, target or not, gets the same size law (radius 8-14.5 % of the shorter side, x U(0.9, 1.1) per
instance), rotation (+-20 degrees), aspect (x U(0.9, 1.1)), colour/texture jitter and a random depth, and is
placed so that occlusion leaves >= 60 % of each target and >= 45 % of each other object visible. So colour,
texture, shape, size, count, position, depth and contrast are each shared by some non-target: only the
combination shown in the supports identifies the target.

**Ground truth.** The query's target label map (visible pixels; label i + 1 for the episode's i-th class), and
per-instance visible masks with class ids and roles (target / distractor / clutter).

**Episodes.** See ``base``: episode i of (split, seed) draws its classes from a seeded permutation of the split's
classes (so the first N episodes cover N distinct classes), its query from stream 0 and support (slot i, shot
j) from stream (1, i, j). ``SyntheticStream`` is the infinite training version, sharded by rank and worker.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from incontext.data.base import EpisodeBenchmark, InstanceGT, QueryDraw, episode_rng, split_key
from incontext.data.shapes import SHAPES, rasterise
from incontext.data.textures import (
    PATTERNS,
    SCHEMES,
    Pattern,
    jitter_colours,
    jitter_pattern,
    paint,
    random_colours,
    random_pattern,
    scheme_colours,
)
from incontext.episode import Support
from incontext.errors import InputError

TABLE_SEED = 20240917  # part of the benchmark's definition: changing it changes every class
N_SHAPES, N_PATTERNS, N_SCHEMES, SHAPES_PER_APPEARANCE = len(SHAPES), len(PATTERNS), len(SCHEMES), 5
SPLITS = ("train", "test", "all")
TABLE_FILE = Path(__file__).resolve().parent / "splits" / "synthetic" / "classes.tsv"

# Scene law (fractions of the shorter image side unless said otherwise).
RADIUS_RANGE = (0.1, 0.17)
ROTATION_DEG = 20.0
COUNT_PROBS = (0.5, 0.3, 0.2)  # 1, 2 or 3 instances of a class in an image
DISTRACTOR_TYPES = ("shape", "appearance", "scheme", "pattern", "random")
DISTRACTOR_PROBS = (0.3, 0.3, 0.15, 0.1, 0.15)
MIN_VISIBLE_TARGET, MIN_VISIBLE_OTHER = 0.6, 0.45
PLACEMENT_TRIES = 15


@dataclass(frozen=True)
class SynthClass:
    """One class: a shape in an appearance (pattern + colour scheme)."""

    id: int
    split: str
    shape: int
    pattern: int
    scheme: int

    @property
    def appearance(self) -> tuple[int, int]:
        return self.pattern, self.scheme

    @property
    def name(self) -> str:
        return f"{SHAPES[self.shape].name}/{PATTERNS[self.pattern].name}/{'-'.join(SCHEMES[self.scheme])}"


def is_test_appearance(pattern: int, scheme: int) -> bool:
    """The documented split rule: appearance (pattern, scheme) is held out iff (p + 3 s) % 5 == 0."""
    return (pattern + 3 * scheme) % 5 == 0


@functools.lru_cache(maxsize=1)
def class_table() -> tuple[SynthClass, ...]:
    """All 1,200 classes: ids 0-959 are train classes, 960-1199 test classes (see the module docstring)."""
    rng = np.random.default_rng(TABLE_SEED)
    out: list[SynthClass] = []
    for split in ("train", "test"):
        apps = [(p, s) for p in range(N_PATTERNS) for s in range(N_SCHEMES)
                if is_test_appearance(p, s) == (split == "test")]
        apps = [apps[i] for i in rng.permutation(len(apps))]
        per_block = N_SHAPES // SHAPES_PER_APPEARANCE
        for b in range(0, len(apps), per_block):
            deal = rng.permutation(N_SHAPES)
            for j, (p, s) in enumerate(apps[b:b + per_block]):
                for q in range(SHAPES_PER_APPEARANCE):
                    out.append(SynthClass(len(out), split, int(deal[j * SHAPES_PER_APPEARANCE + q]), p, s))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _class_combos() -> frozenset[tuple[int, int, int]]:
    return frozenset((c.shape, c.pattern, c.scheme) for c in class_table())


def table_tsv() -> str:
    """The class table as the text committed in ``splits/synthetic/classes.tsv``."""
    lines = ["# incontext procedural benchmark classes; generated by incontext.data.synthetic.class_table()",
             "id\tsplit\tshape\tpattern\tscheme\tname"]
    for c in class_table():
        lines.append(f"{c.id}\t{c.split}\t{c.shape}\t{c.pattern}\t{c.scheme}\t{c.name}")
    return "\n".join(lines) + "\n"


class _Pools:
    """Index of one split's classes by shared factor, for choosing hard distractors."""

    def __init__(self, classes: Sequence[SynthClass]) -> None:
        self.ids = [c.id for c in classes]
        self.by: dict[str, dict] = {"shape": {}, "appearance": {}, "scheme": {}, "pattern": {}}
        for c in classes:
            self.by["shape"].setdefault(c.shape, []).append(c.id)
            self.by["appearance"].setdefault(c.appearance, []).append(c.id)
            self.by["scheme"].setdefault(c.scheme, []).append(c.id)
            self.by["pattern"].setdefault(c.pattern, []).append(c.id)

    def twins(self, kind: str, c: SynthClass) -> list[int]:
        """Classes sharing exactly the factor ``kind`` with ``c`` (shape twins differ in appearance, etc.)."""
        table = class_table()
        if kind == "shape":
            return [i for i in self.by["shape"][c.shape] if table[i].appearance != c.appearance]
        if kind == "appearance":
            return [i for i in self.by["appearance"][c.appearance] if table[i].shape != c.shape]
        if kind == "scheme":
            return [i for i in self.by["scheme"][c.scheme]
                    if table[i].pattern != c.pattern and table[i].shape != c.shape]
        if kind == "pattern":
            return [i for i in self.by["pattern"][c.pattern]
                    if table[i].scheme != c.scheme and table[i].shape != c.shape]
        return list(self.ids)


@dataclass
class _Item:
    shape: int
    pattern: Pattern
    colours: np.ndarray
    radius: float
    angle: float
    aspect: float
    light: tuple[float, float]
    class_id: int  # -1 = clutter
    label: int  # > 0 for targets
    role: str
    centre: tuple[float, float] = (0.0, 0.0)
    force: bool = False  # placed even if it hides others more than allowed (targets, first distractor)


@dataclass
class Scene:
    """One rendered image: ``image`` (H, W, 3) uint8, ``labels`` (H, W) uint8 target label map and per-object
    ``instances`` (visible masks)."""

    image: np.ndarray
    labels: np.ndarray
    instances: list[InstanceGT]


def _count(rng: np.random.Generator, cap: int = 3) -> int:
    return min(cap, 1 + int(rng.choice(3, p=COUNT_PROBS)))


class SceneRenderer:
    """Renders scenes of one split's classes at one resolution.

    Args:
        split: "train", "test" or "all" (the distractor pool is the same split's classes).
        size: image side in pixels (square images).
    """

    def __init__(self, split: str = "test", size: int = 128) -> None:
        if split not in SPLITS:
            raise InputError(f"benchmark.split: {split!r}; pass one of {', '.join(SPLITS)}")
        if int(size) < 32:
            raise InputError(f"benchmark.size: {size!r}; pass 32 pixels or more (128 trains, 224+ evaluates)")
        self.split = split
        self.size = int(size)
        self.classes = [c for c in class_table() if split == "all" or c.split == split]
        self.pools = _Pools(self.classes)
        s = self.size
        self._yy, self._xx = np.mgrid[0:s, 0:s].astype(np.float32)

    # ----------------------------------------------------------------- choosing what is in an image
    def _class_item(self, rng: np.random.Generator, cid: int, label: int, role: str, base_r: float) -> _Item:
        c = class_table()[cid]
        return _Item(
            shape=c.shape,
            pattern=jitter_pattern(PATTERNS[c.pattern], rng),
            colours=jitter_colours(scheme_colours(c.scheme), rng),
            radius=base_r * float(rng.uniform(0.9, 1.1)),
            angle=math.radians(float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))),
            aspect=float(rng.uniform(0.9, 1.1)),
            light=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
            class_id=cid, label=label, role=role,
        )

    def _clutter_item(self, rng: np.random.Generator) -> _Item:
        """An unlabelled object: a combination of the class factors that is no class of the table."""
        while True:
            combo = (int(rng.integers(N_SHAPES)), int(rng.integers(N_PATTERNS)), int(rng.integers(N_SCHEMES)))
            if combo not in _class_combos():
                break
        shape, pattern, scheme = combo
        return _Item(
            shape=shape,
            pattern=jitter_pattern(PATTERNS[pattern], rng),
            colours=jitter_colours(scheme_colours(scheme), rng),
            radius=self._base_radius(rng) * float(rng.uniform(0.9, 1.1)),
            angle=math.radians(float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))),
            aspect=float(rng.uniform(0.9, 1.1)),
            light=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
            class_id=-1, label=0, role="clutter",
        )

    def _base_radius(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(*RADIUS_RANGE)) * self.size

    def distractor_groups(self, rng: np.random.Generator, anchors: Sequence[int],
                          exclude: set[int]) -> list[tuple[int, int, str]]:
        """[(class id, instances, twin kind)] with 1-4 instances in total, relative to random anchors."""
        table = class_table()
        total = 1 + int(rng.integers(4))
        groups: list[tuple[int, int, str]] = []
        used = set(exclude)
        while total > 0:
            kind = DISTRACTOR_TYPES[int(rng.choice(len(DISTRACTOR_TYPES), p=DISTRACTOR_PROBS))]
            anchor = table[int(anchors[int(rng.integers(len(anchors)))])]
            pool = [i for i in self.pools.twins(kind, anchor) if i not in used]
            if not pool:
                kind, pool = "random", [i for i in self.pools.ids if i not in used]
            cid = int(pool[int(rng.integers(len(pool)))])
            n = min(_count(rng), total)
            groups.append((cid, n, kind))
            used.add(cid)
            total -= n
        return groups

    # ----------------------------------------------------------------- rendering
    def scene(self, rng: np.random.Generator, targets: Sequence[int], exclude: Sequence[int] = (),
              max_per_class: int = 3) -> Scene:
        """Render one image with instances of ``targets`` (label i + 1 for ``targets[i]``).

        Args:
            rng: the only source of randomness.
            targets: class ids to show (labelled).
            exclude: class ids that must not appear as distractors (the episode's other classes).
            max_per_class: cap on instances per target class (multi-class episodes use 2).
        """
        items: list[_Item] = []
        for i, cid in enumerate(targets):
            base = self._base_radius(rng)
            items += [self._class_item(rng, int(cid), i + 1, "target", base)
                      for _ in range(_count(rng, max_per_class))]
        for cid, n, _kind in self.distractor_groups(rng, targets, set(targets) | set(exclude)):
            base = self._base_radius(rng)
            items += [self._class_item(rng, cid, 0, "distractor", base) for _ in range(n)]
        for it in items:
            it.force = it.role == "target"
        next(it for it in items if it.role == "distractor").force = True  # every image has a distractor
        for _ in range(3 + int(rng.integers(3))):
            items.append(self._clutter_item(rng))
        order = rng.permutation(len(items))  # depth: first placed is deepest
        items = [items[i] for i in order]
        for _ in range(20):  # placements are redrawn (same stream) in the rare case a target ends up hidden
            top, placed = self._place(rng, items)
            shown = {items[k].label for k in np.unique(top[top >= 0])}
            if all(i + 1 in shown for i in range(len(targets))):
                return self._paint(rng, items, top, placed)
        raise AssertionError("could not place the targets visibly; the scene law is too crowded")

    def _place(self, rng: np.random.Generator, items: list[_Item]) -> tuple[np.ndarray, list[int]]:
        """Place items bottom to top; returns the (H, W) map of the top item index (-1 = background) and
        the indices placed. Positions are redrawn until occlusion keeps every earlier object visible enough."""
        s = self.size
        top = np.full((s, s), -1, np.int16)
        area = np.zeros(len(items), np.int64)
        visible = np.zeros(len(items), np.int64)
        need = np.array([MIN_VISIBLE_TARGET if it.role == "target" else MIN_VISIBLE_OTHER for it in items])
        placed: list[int] = []
        for k, it in enumerate(items):
            best = None
            for _ in range(PLACEMENT_TRIES):
                m = 0.5 * it.radius
                centre = (float(rng.uniform(m, s - m)), float(rng.uniform(m, s - m)))
                mask = rasterise(it.shape, (s, s), centre, it.radius, it.angle, it.aspect)
                if not mask.any():
                    continue
                lost = np.bincount(top[mask].astype(np.int64) + 1, minlength=len(items) + 1)[1:]
                ok_frac = np.ones(len(items))
                if placed:
                    idx = np.asarray(placed)
                    ok_frac[idx] = (visible[idx] - lost[idx]) / np.maximum(area[idx], 1)
                margin = float(np.min(ok_frac - need))
                if best is None or margin > best[0]:
                    best = (margin, centre, mask, lost)
                if margin >= 0:
                    break
            if best is None or (best[0] < 0 and not it.force):
                continue  # a non-target that cannot fit without hiding others is left out
            _, it.centre, mask, lost = best
            visible -= lost
            top[mask] = k
            area[k] = visible[k] = int(mask.sum())
            placed.append(k)
        return top, placed

    def _background(self, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
        """(H, W) region index of a warped Voronoi mosaic and each region's (pattern, colours, frame)."""
        s = self.size
        k = 4 + int(rng.integers(5))
        seeds = rng.uniform(0, s, (k, 2)).astype(np.float32)
        amp, wl = 0.05 * s, float(rng.uniform(0.35, 0.7)) * s
        ph = rng.uniform(0, 2 * np.pi, 2)
        xw = self._xx + amp * np.sin(2 * np.pi * self._yy / wl + ph[0])
        yw = self._yy + amp * np.sin(2 * np.pi * self._xx / wl + ph[1])
        best = np.full((s, s), np.inf, np.float32)
        region = np.zeros((s, s), np.int16)
        for i in range(k):
            d = (xw - seeds[i, 0]) ** 2 + (yw - seeds[i, 1]) ** 2
            closer = d < best
            best[closer] = d[closer]
            region[closer] = i
        looks = []
        for _ in range(k):
            looks.append((
                jitter_pattern(random_pattern(rng), rng), random_colours(rng),
                (float(rng.uniform(0, s)), float(rng.uniform(0, s))),  # frame origin
                self._base_radius(rng), float(rng.uniform(0, 2 * np.pi)),
                (float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
            ))
        return region, looks

    def _paint(self, rng: np.random.Generator, items: list[_Item], top: np.ndarray,
               placed: list[int]) -> Scene:
        s = self.size
        region, looks = self._background(rng)
        # One owner per pixel: the top item, else len(items) + its background region; pixels are then
        # grouped by owner with one sort, and each owner paints only its own pixels.
        owner = np.where(top >= 0, top, len(items) + region).ravel()
        order = np.argsort(owner, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(items) + len(looks)))])
        img = np.empty((s * s, 3), np.float32)
        labels = np.zeros(s * s, np.uint8)
        instances: list[InstanceGT] = []
        for r, (pat, cols, origin, rad, ang, light) in enumerate(looks):
            idx = order[bounds[len(items) + r]:bounds[len(items) + r + 1]]
            if len(idx) == 0:
                continue
            ys, xs = np.divmod(idx, s)
            u, v = self._frame(xs, ys, origin, rad, ang, 1.0)
            # Shading in image coordinates: the region's frame origin may lie far from its pixels.
            shade = 1.0 + light[0] * (xs / s - 0.5) + light[1] * (ys / s - 0.5)
            img[idx] = paint(pat, cols, u, v) * shade[:, None].astype(np.float32)
        for k in placed:
            it = items[k]
            idx = order[bounds[k]:bounds[k + 1]]
            if len(idx) == 0:
                continue
            ys, xs = np.divmod(idx, s)
            u, v = self._frame(xs, ys, it.centre, it.radius, it.angle, it.aspect)
            img[idx] = paint(it.pattern, it.colours, u, v, it.light)
            if it.label:
                labels[idx] = it.label
            instances.append(InstanceGT(top == k, it.class_id, it.label, it.role))
        img = img.reshape(s, s, 3)
        img *= rng.uniform(0.93, 1.07, 3).astype(np.float32)
        img = cv2.GaussianBlur(img, (0, 0), 0.45 * max(1.0, s / 128))
        img += rng.standard_normal(img.shape, dtype=np.float32) * 3.0
        return Scene(np.clip(img, 0, 255).astype(np.uint8), labels.reshape(s, s), instances)

    @staticmethod
    def _frame(xs: np.ndarray, ys: np.ndarray, centre: tuple[float, float], radius: float, angle: float,
               aspect: float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (x, y) -> object frame (u, v) in units of the radius (inverse of ``rasterise``)."""
        dx = (xs.astype(np.float32) - centre[0]) / radius
        dy = (ys.astype(np.float32) - centre[1]) / radius
        c, s = math.cos(angle), math.sin(angle)
        u = (c * dx - s * dy) / aspect
        v = s * dx + c * dy
        return u, v


class SyntheticBenchmark(EpisodeBenchmark):
    """Few-shot episodes of the procedural benchmark (``benchmark=synthetic``).

    Args:
        split: "test" (240 held-out classes, the default for evaluation), "train" (960 classes) or "all".
        size: square image side in pixels (128 for CPU training, 224+ for evaluation).
        ways: classes per episode (query label map 0..ways); 1 = binary episodes.
        shots, episodes, seed, supports: see ``EpisodeBenchmark``.
    """

    default_episodes = 1000

    def __init__(self, split: str = "test", size: int = 224, ways: int = 1, shots: int = 1,
                 episodes: int | None = None, seed: int = 0, supports: str = "matched") -> None:
        super().__init__(shots=shots, episodes=episodes, seed=seed, supports=supports)
        self.renderer = SceneRenderer(split, size)
        if not 1 <= int(ways) <= 5:
            raise InputError(f"benchmark.ways: {ways!r}; pass 1 to 5")
        self.ways = int(ways)
        self.split = split
        self.name = f"synthetic/{split}"
        self._ids = [c.id for c in self.renderer.classes]
        self._perms: dict[int, np.ndarray] = {}

    @property
    def key(self) -> int:
        return split_key(self.name)

    @property
    def class_ids(self) -> list[int]:
        return list(self._ids)

    def class_name(self, class_id: int) -> str:
        return class_table()[class_id].name

    def episode_classes(self, index: int) -> list[int]:
        """The episode's classes: consecutive entries of a seeded permutation of the split's classes,
        a fresh permutation for each pass over them."""
        n = len(self._ids)
        flat = index * self.ways
        out = []
        for w in range(self.ways):
            p, r = divmod(flat + w, n)
            if p not in self._perms:
                self._perms[p] = episode_rng(self.seed, self.key, p, 99).permutation(n)
            out.append(self._ids[int(self._perms[p][r])])
        if len(set(out)) < len(out):  # a permutation boundary repeated a class: take the next free ones
            seen: list[int] = []
            for c in out:
                while c in seen:
                    c = self._ids[(self._ids.index(c) + 1) % n]
                seen.append(c)
            out = seen
        return out

    def _query(self, index: int, rng: np.random.Generator) -> QueryDraw:
        classes = self.episode_classes(index)
        sc = self.renderer.scene(rng, classes, max_per_class=3 if self.ways == 1 else 2)
        return QueryDraw(sc.image, sc.labels, classes, name=f"synthetic:{self.split}:{index}",
                         instances=sc.instances)

    def _supports(self, index: int, classes: Sequence[int], exclude: QueryDraw) -> list[Support]:
        out = []
        for i, cid in enumerate(classes):
            others = [c for c in classes if c != cid] + list(exclude.classes)
            for j in range(self.shots):
                sc = self.renderer.scene(self.support_rng(index, i, j), [cid], exclude=others)
                mask = (sc.labels > 0).astype(np.uint8) * (i + 1)
                out.append(Support.from_arrays(sc.image, mask, name=f"synthetic:{cid}:{index}:{i}:{j}"))
        return out


class SyntheticStream(IterableDataset):
    """An infinite stream of training episodes, sharded so that every (rank, worker) sees disjoint indices.

    Item n of the stream of rank r (of ``world``) and DataLoader worker w (of W) is episode
    ``(n * world + r) * W + w`` of ``SyntheticBenchmark(split, ...)`` with this ``seed``: it depends only on
    (seed, split, index), never on the number of workers' timing. Use with ``DataLoader(stream, batch_size=...,
    collate_fn=list, num_workers=...)``.

    Args:
        split, size, ways, shots, seed: as ``SyntheticBenchmark`` (``split`` defaults to "train").
        rank, world: this process's place in distributed training.
        start: first stream position (to resume).
    """

    def __init__(self, split: str = "train", size: int = 128, ways: int = 1, shots: int = 1, seed: int = 0,
                 rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.bench = SyntheticBenchmark(split=split, size=size, ways=ways, shots=shots, episodes=1, seed=seed)
        self.rank, self.world, self.start = int(rank), int(world), int(start)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        n = self.start
        while True:
            yield self.bench.episode((n * self.world + self.rank) * nw + wid)
            n += 1
