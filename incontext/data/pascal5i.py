"""PASCAL-5i (Shaban et al., BMVC 2017) in HSNet's layout and protocol.

Layout: ``<root>/VOC2012/JPEGImages/<id>.jpg`` and ``<root>/VOC2012/SegmentationClassAug/<id>.png`` (the
SBD-augmented label maps: 0 background, 1-20 classes, 255 object borders). Folds: fold f tests classes
5f+1..5f+5 (contiguous). Episode lists are HSNet's (``splits/pascal5i/val/fold<f>.txt``: ``<id>__<class>``,
from juhongm999/hsnet; train lists ``trn/fold<f>.txt.gz`` are the other folds' training images). Test protocol:
1,000 episodes per fold, the query of episode i is line i % N of the fold list, its supports are other images
of that class from the same list; 255 is ignored by the metrics. Get VOC2012 from the PASCAL VOC site and
SegmentationClassAug from the SBD release (as prepared by e.g. HSNet's README).
"""

from __future__ import annotations

import numpy as np

from incontext.data.base import IGNORE
from incontext.data.files import FileBenchmark, check_fold_split, require_dir, split_lines
from incontext.errors import InputError

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor")  # VOC label order: label = index + 1


class Pascal5i(FileBenchmark):
    """PASCAL-5i episodes (``benchmark=pascal5i benchmark.root=<folder with VOC2012/> benchmark.fold=0``).

    Args:
        root: the folder that holds ``VOC2012/``.
        fold: 0-3.
        split: "val" (test protocol, default) or "trn" (the other folds' training images).
        shots, episodes (default 1000), seed, supports: see ``EpisodeBenchmark``.
    """

    default_episodes = 1000

    def __init__(self, root: str | None = None, fold: int = 0, split: str = "val", **kw) -> None:
        super().__init__(**kw)
        check_fold_split(fold, split, 4)
        base = require_dir(root, what="PASCAL VOC2012 + SegmentationClassAug",
                           layout="<root>/VOC2012/JPEGImages and <root>/VOC2012/SegmentationClassAug",
                           source="the PASCAL VOC 2012 site + the SBD augmented masks (see HSNet's README)")
        voc = base / "VOC2012"
        for sub in ("JPEGImages", "SegmentationClassAug"):
            if not (voc / sub).is_dir():
                raise InputError(f"benchmark.root: no {voc / sub}; the root must hold VOC2012/{sub}")
        self.img_dir, self.ann_dir = voc / "JPEGImages", voc / "SegmentationClassAug"
        self.fold, self.split, self.name = int(fold), split, f"pascal5i/{split}/fold{int(fold)}"
        folds = [self.fold] if split == "val" else [f for f in range(4) if f != self.fold]
        lines = []
        for f in folds:
            lines += split_lines(f"pascal5i/{split}/fold{f}.txt" + ("" if split == "val" else ".gz"))
        for ln in lines:
            name, cls = ln.split("__")
            cid = int(cls) - 1  # HSNet's 0-based class ids
            self.queries.append((name, cid))
            self.pool.setdefault(cid, []).append(name)
            self.names[cid] = CLASSES[cid]
        self._check_nonempty()

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from incontext.io import read_image

        image = read_image(self.img_dir / f"{item}.jpg", name=f"PASCAL image {item}")
        path = self.ann_dir / f"{item}.png"
        if not path.is_file():
            raise InputError(f"PASCAL-5i: no mask {path}")
        with Image.open(path) as im:
            labels = np.asarray(im)  # palette indices are the labels
        if labels.shape != image.shape[:2]:
            raise InputError(f"PASCAL-5i: mask {path} is {labels.shape} but its image is {image.shape[:2]}")
        mask = (labels == class_id + 1).astype(np.uint8)
        mask[labels == IGNORE] = IGNORE
        return image, mask
