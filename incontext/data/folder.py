"""Users' own few-shot sets: ``<root>/<class>/<name>.jpg`` with its mask ``<name>.png``.

Each sub-folder of ``root`` is a class; inside it, images pair with masks by ``incontext.io.load_pairs_from_dir``
(``name.jpg`` + ``name.png``, or ``name.png`` + ``name_mask.png``; any image format ``read_image`` reads). Masks
may be 0/1, 0/255, palette or label maps: every non-zero label is the object, except 255 in a mask that also has
other labels (a VOC-style border), which the metrics ignore.

Episodes (like FSS-1000): every image of every class is a query once, classes and images in name order
(``episodes`` defaults to their number; more episodes wrap around with new supports); the supports are ``shots``
other images of the same class, drawn per episode from the seed. A class needs at least 2 images.
"""

from __future__ import annotations

import numpy as np

from incontext.data.base import IGNORE
from incontext.data.files import FileBenchmark, require_dir
from incontext.errors import InputError


class FolderBenchmark(FileBenchmark):
    """Few-shot episodes from a folder of class folders (``benchmark=folder benchmark.root=<dir>``).

    Args:
        root: the folder of class folders.
        episodes: default (None) = every image once.
        shots, seed, supports: see ``EpisodeBenchmark``.
    """

    def __init__(self, root: str | None = None, episodes: int | None = None, **kw) -> None:
        from incontext.io import load_pairs_from_dir

        super().__init__(episodes=episodes or 1, **kw)
        base = require_dir(root, what="a few-shot set", layout="<root>/<class>/<name>.jpg + <name>.png",
                           source="your own images and masks")
        self.root, self.name = base, f"folder:{base.name}"
        self.files: dict[str, tuple] = {}
        classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise InputError(f"benchmark.root: '{base}' has no class folders; expected <root>/<class>/<name>.jpg + <name>.png")
        skipped = []
        for cid, d in enumerate(classes):
            pairs = load_pairs_from_dir(d)
            if len(pairs) < 2:
                skipped.append(d.name)
                continue
            self.names[cid] = d.name
            for img, mask in pairs:
                key = f"{d.name}/{img.name}"
                self.files[key] = (img, mask)
                self.pool.setdefault(cid, []).append(key)
                self.queries.append((key, cid))
        if not self.queries:
            raise InputError(f"benchmark.root: no class folder in '{base}' has 2 or more image/mask pairs")
        self.skipped = skipped  # classes with one image cannot give a support other than the query
        self.episodes = len(self.queries) if episodes is None else int(episodes)

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from incontext.io import read_image, read_mask

        img_path, mask_path = self.files[item]
        image = read_image(img_path, name=str(img_path))
        labels = read_mask(mask_path, name=str(mask_path))
        if labels.shape != image.shape[:2]:
            raise InputError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image is "
                             f"{image.shape[1]}x{image.shape[0]}; resize the mask to the image")
        fg = (labels > 0) & (labels != IGNORE)
        mask = fg.astype(np.uint8)
        if fg.any():
            mask[labels == IGNORE] = IGNORE
        else:
            mask = (labels > 0).astype(np.uint8)
        return image, mask
