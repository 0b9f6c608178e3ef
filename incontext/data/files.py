"""Shared machinery of the loaders of real datasets read from a local folder.

``FileBenchmark`` is an ``EpisodeBenchmark`` whose episodes pick a query image (by the benchmark's protocol)
and supports among the other images of the same class, all through the seeded generators of ``base``. Loaders
only say where files are and how a mask becomes a 0/1 (+255 ignore) target.

Also here: reading the committed split lists (``splits/``), a restricted unpickler for the annotation pickles
that LVIS-92i ships (only plain containers and numpy arrays may be rebuilt: no code runs), and COCO polygon /
RLE decoding without pycocotools.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from incontext.data.base import IGNORE, EpisodeBenchmark, QueryDraw
from incontext.episode import Support
from incontext.errors import InputError

SPLITS_DIR = Path(__file__).resolve().parent / "splits"


def require_dir(path: str | Path | None, *, what: str, layout: str, source: str, key: str = "benchmark.root") -> Path:
    """The folder ``path``, or an ``InputError`` naming what is missing, where it looked, how to get it and the
    config key to set."""
    if path in (None, ""):
        raise InputError(f"{key}: not set; pass {key}=<folder holding {what}> ({layout}; get it from {source})")
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise InputError(f"{key}: {what} not found at '{p}' (expected {layout}); get it from {source} and pass "
                         f"{key}=<that folder>")
    return p


def check_fold_split(fold: int, split: str, n_folds: int) -> None:
    """Refuse a fold outside 0..n_folds-1 or a split other than "val"/"trn", naming the config key and the fix."""
    if int(fold) not in range(n_folds):
        raise InputError(f"benchmark.fold: {fold!r}; pass 0 to {n_folds - 1}")
    if split not in ("val", "trn"):
        raise InputError(f"benchmark.split: {split!r}; pass val or trn")


def split_lines(relpath: str) -> list[str]:
    """Non-empty, non-comment lines of a committed split file (``.gz`` read transparently)."""
    path = SPLITS_DIR / relpath
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and numpy arrays only; any other class is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an annotation pickle")


def safe_load_pickle(path: Path) -> Any:
    """Load an annotation pickle with ``_SafeUnpickler`` (clear error if it holds anything else)."""
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a plain annotation pickle ({err}); use the file the dataset ships") from None


def rle_decode(rle: dict, h: int, w: int) -> np.ndarray:
    """COCO run-length encoding -> (h, w) bool. ``counts`` is a list of run lengths or COCO's compressed
    string (6-bit chunks with continuation bit, deltas from the run two back); runs are column-major."""
    counts = rle["counts"]
    if isinstance(counts, (bytes, str)):
        s = counts.encode() if isinstance(counts, str) else counts
        runs: list[int] = []
        p = 0
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                c = s[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
        counts = runs
    size = rle.get("size", [h, w])
    hh, ww = int(size[0]), int(size[1])
    flat = np.zeros(hh * ww, np.uint8)
    pos, val = 0, 0
    for n in counts:
        if val:
            flat[pos:pos + int(n)] = 1
        pos += int(n)
        val ^= 1
    return flat.reshape(ww, hh).T.astype(bool)


def polygons_to_mask(polys: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """COCO polygons (each a flat [x0, y0, x1, y1, ...] in pixels) -> (h, w) bool."""
    canvas = np.zeros((h, w), np.uint8)
    pts = [np.round(np.asarray(p, np.float64).reshape(-1, 2) * 16).astype(np.int32) for p in polys if len(p) >= 6]
    if pts:
        cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def segm_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO/LVIS ``segmentation`` (polygons, RLE dict or array) -> (h, w) bool."""
    if isinstance(segm, list):
        return polygons_to_mask(segm, h, w)
    if isinstance(segm, dict):
        return rle_decode(segm, h, w)
    a = np.asarray(segm)
    if a.ndim != 2:
        raise InputError(f"segmentation: array of shape {a.shape}; expected (H, W)")
    return a.astype(bool)


class FileBenchmark(EpisodeBenchmark):
    """Episodes over image files: subclasses fill ``self.names`` {class id: name}, ``self.pool`` {class id:
    [item]} (support candidates) and either ``self.queries`` [(item, class id)] (episode i uses
    ``queries[i % len]``, as HSNet's PASCAL/FSS) or override ``_pick``; and implement ``_load``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.names: dict[int, str] = {}
        self.pool: dict[int, list[str]] = {}
        self.queries: list[tuple[str, int]] = []

    @property
    def class_ids(self) -> list[int]:
        return sorted(self.names)

    def class_name(self, class_id: int) -> str:
        return self.names[int(class_id)]

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask (H, W) uint8 with 1 = the class, 255 = ignore, 0 = other)."""
        raise NotImplementedError

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[str, int]:
        return self.queries[index % len(self.queries)]

    def _query(self, index: int, rng: np.random.Generator) -> QueryDraw:
        item, cid = self._pick(index, rng)
        image, mask = self._load(item, cid)
        return QueryDraw(image, mask, [int(cid)], name=item)

    def _supports(self, index: int, classes: Sequence[int], exclude: QueryDraw) -> list[Support]:
        """``shots`` images of each class other than the query, in a seeded random order; images whose mask
        lacks the class are skipped; fewer usable images than shots are reused."""
        out = []
        for slot, cid in enumerate(classes):
            cands = [x for x in self.pool[int(cid)] if x != exclude.name]
            if not cands:
                raise InputError(f"benchmark {self.name}: class {self.class_name(cid)!r} has no image other than "
                                 f"the query {exclude.name!r} to use as a support")
            rng = self.support_rng(index, slot)
            chosen: list[tuple[str, np.ndarray, np.ndarray]] = []
            for j in rng.permutation(len(cands)):
                image, mask = self._load(cands[int(j)], int(cid))
                if (mask == 1).any():
                    chosen.append((cands[int(j)], image, mask))
                if len(chosen) == self.shots:
                    break
            if not chosen:
                raise InputError(f"benchmark {self.name}: class {self.class_name(cid)!r} has no image with a "
                                 "non-empty mask other than the query; it cannot give supports")
            for j in range(self.shots):
                item, image, mask = chosen[j % len(chosen)]
                lab = np.where(mask == 1, slot + 1, np.where(mask == IGNORE, IGNORE, 0)).astype(np.uint8)
                out.append(Support.from_arrays(image, lab, name=item))
        return out

    def _check_nonempty(self) -> None:
        if not self.queries and type(self)._pick is FileBenchmark._pick:
            raise InputError(f"benchmark {self.name}: no query image found; check benchmark.root and the layout")
