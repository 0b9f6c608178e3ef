"""LVIS-92i (introduced by Matcher, Liu et al., ICLR 2024) laid out and sampled as Matcher does.

Layout (Matcher's ``datasets/README.md``): ``<root>/coco/{train2017,val2017}/*.jpg`` and the extended annotation
pickles ``<root>/lvis_train.pkl``, ``<root>/lvis_val.pkl``: {category id: {image path relative to ``coco/``:
{"annotations": [{"segmentation": polygons | RLE | array}, ...]}}}. Folds (the generating rule, from
aim-uofa/Matcher ``matcher/data/lvis.py``; the class lists come from the pickle, which is not shipped here):
the val categories with more than ``shots`` images, in the pickle's order, are dealt into 10 folds; fold f
tests categories f, f+10, f+20, ... (92 per fold for 1-shot). Episodes: 2,300 per fold; episode i uses class
i % N, a random query image of that class and ``shots`` other random images as supports; the target is the
union of the class's annotations. The pickles are read with a restricted unpickler (containers and arrays
only). Get them from Matcher's README (``lvis.zip``) and COCO2017 images from cocodataset.org.
"""

from __future__ import annotations

import numpy as np

from incontext.data.files import FileBenchmark, check_fold_split, require_dir, safe_load_pickle, segm_to_mask
from incontext.errors import InputError

N_FOLDS = 10


class Lvis92i(FileBenchmark):
    """LVIS-92i episodes (``benchmark=lvis92i benchmark.root=<LVIS folder> benchmark.fold=0``).

    Args:
        root: the folder holding ``coco/`` and ``lvis_{train,val}.pkl``.
        fold: 0-9.
        split: "val" (test protocol) or "trn" (train categories not in the fold).
        shots, episodes (default 2300), seed, supports: see ``EpisodeBenchmark``.
    """

    default_episodes = 2300

    def __init__(self, root: str | None = None, fold: int = 0, split: str = "val", **kw) -> None:
        super().__init__(**kw)
        check_fold_split(fold, split, N_FOLDS)
        base = require_dir(root, what="LVIS-92i", layout="<root>/coco/{train2017,val2017} + <root>/lvis_val.pkl",
                           source="Matcher's datasets/README.md (lvis.zip) and cocodataset.org (COCO2017)")
        paths = {s: base / f"lvis_{s}.pkl" for s in ("train", "val")}
        for p in paths.values():
            if not p.is_file():
                raise InputError(f"benchmark.root: no {p}; LVIS-92i needs lvis_train.pkl and lvis_val.pkl there")
        self.root, self.fold, self.split = base, int(fold), split
        self.name = f"lvis92i/{split}/fold{self.fold}"
        val = safe_load_pickle(paths["val"])
        val_ids = [k for k in val if len(val[k]) > self.shots]
        fold_ids = [val_ids[self.fold + N_FOLDS * v] for v in range(len(val_ids) // N_FOLDS)]
        if split == "val":
            self.anno, ids = val, fold_ids
        else:
            train = safe_load_pickle(paths["train"])
            self.anno, ids = train, [k for k in train if len(train[k]) > self.shots and k not in set(fold_ids)]
        if not ids:
            raise InputError(f"LVIS-92i: no category with more than {self.shots} images in {paths['val']}")
        self.order = list(ids)
        for k in ids:
            cid = int(k)
            self.pool[cid] = list(self.anno[k])
            self.names[cid] = f"lvis{cid}"

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[str, int]:
        cid = int(self.order[index % len(self.order)])
        items = self.pool[cid]
        return items[int(rng.integers(len(items)))], cid

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from incontext.io import read_image

        image = read_image(self.root / "coco" / item, name=f"LVIS image {item}")
        h, w = image.shape[:2]
        entry = self.anno[class_id][item] if class_id in self.anno else self.anno[str(class_id)][item]
        mask = np.zeros((h, w), bool)
        for ann in entry["annotations"]:
            m = segm_to_mask(ann["segmentation"], h, w)
            if m.shape != (h, w):
                raise InputError(f"LVIS-92i: an annotation of {item} is {m.shape}, the image is {(h, w)}")
            mask |= m
        return image, mask.astype(np.uint8)
