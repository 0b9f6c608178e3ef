"""PerSeg (introduced by PerSAM, Zhang et al., ICLR 2024): 40 personal objects, one reference each.

Layout: ``<root>/Images/<object>/<nn>.jpg`` and ``<root>/Annotations/<object>/<nn>.png`` (palette PNGs whose
foreground is index 1). Protocol (PerSAM's ``persam.py``): per object, the first image (``00``) is the support
and every other image a query; with ``shots=k`` the first k images are the supports. Episodes: every
(object, query image) once, objects and images in name order, so ``episodes`` defaults to the number of queries.
Get PerSeg from the PerSAM repository (ZrrSkywalker/Personalize-SAM).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from incontext.data.base import QueryDraw
from incontext.data.files import FileBenchmark, require_dir
from incontext.episode import Support
from incontext.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PerSeg(FileBenchmark):
    """PerSeg episodes (``benchmark=perseg benchmark.root=<PerSeg folder>``).

    Args:
        root: the folder holding ``Images/`` and ``Annotations/``.
        shots: references per object (PerSAM: 1).
        episodes: default (None) = every query once.
        seed, supports: see ``EpisodeBenchmark`` (shuffled: another object's references).
    """

    def __init__(self, root: str | None = None, episodes: int | None = None, **kw) -> None:
        super().__init__(episodes=episodes or 1, **kw)
        base = require_dir(root, what="PerSeg", layout="<root>/Images/<object>/*.jpg + <root>/Annotations/<object>/*.png",
                           source="the PerSAM repository (ZrrSkywalker/Personalize-SAM)")
        for sub in ("Images", "Annotations"):
            if not (base / sub).is_dir():
                raise InputError(f"benchmark.root: no {base / sub}; PerSeg needs Images/ and Annotations/")
        self.root, self.name = base, "perseg"
        objects = sorted(p.name for p in (base / "Images").iterdir() if p.is_dir())
        for cid, obj in enumerate(objects):
            files = sorted(p.name for p in (base / "Images" / obj).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) <= self.shots:
                raise InputError(f"PerSeg: object {obj!r} has {len(files)} images; shots={self.shots} leaves no query")
            self.names[cid] = obj
            self.pool[cid] = [f"{obj}/{f}" for f in files[: self.shots]]  # the references
            self.queries += [(f"{obj}/{f}", cid) for f in files[self.shots:]]
        self._check_nonempty()
        self.episodes = len(self.queries) if episodes is None else int(episodes)

    def _supports(self, index: int, classes: Sequence[int], exclude: QueryDraw) -> list[Support]:
        out = []
        for slot, cid in enumerate(classes):
            for item in self.pool[int(cid)]:
                image, mask = self._load(item, int(cid))
                out.append(Support.from_arrays(image, mask * np.uint8(slot + 1), name=item))
        return out

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from incontext.io import read_image, read_mask

        obj, fname = item.split("/", 1)
        image = read_image(self.root / "Images" / item, name=f"PerSeg image {item}")
        path = self.root / "Annotations" / obj / (fname.rsplit(".", 1)[0] + ".png")
        if not path.is_file():
            raise InputError(f"PerSeg: no mask {path} for image {item}")
        labels = read_mask(path, name=f"PerSeg mask {path}")
        if labels.shape != image.shape[:2]:
            raise InputError(f"PerSeg: mask {path} is {labels.shape} but its image is {image.shape[:2]}")
        return image, (labels > 0).astype(np.uint8)
