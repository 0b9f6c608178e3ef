"""COCO-20i (Nguyen & Todorovic, ICCV 2019) in HSNet's layout and protocol (as Matcher uses it).

Layout: ``<root>/val2014/COCO_val2014_<id>.jpg`` and per-image class masks
``<root>/annotations/val2014/COCO_val2014_<id>.png`` (pixel value = class index + 1 in COCO's 80-category
order, 0 background), the same for ``train2014``. Folds are interleaved: fold f tests classes f, f+4, ...,
f+76. The images of each class are HSNet's lists (``splits/coco20i/val.txt.gz``, converted from
juhongm999/hsnet ``data/splits/coco/val/fold*.pkl``). Test protocol: 1,000 episodes per fold, each draws a class
uniformly, a query uniformly from that class's list and supports among the others. ``split="trn"`` builds the
lists from the training masks instead (an image belongs to a class if its mask contains it; HSNet's train
pickles, 15 MB, are not shipped). Get the images from cocodataset.org and the masks from HSNet's README links.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.data.files import FileBenchmark, check_fold_split, require_dir, split_lines
from incontext.errors import InputError

CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # COCO's 80 categories in id order; HSNet's class index


def fold_classes(fold: int) -> list[int]:
    """Test classes of a fold (interleaved split)."""
    return [fold + 4 * v for v in range(20)]


class Coco20i(FileBenchmark):
    """COCO-20i episodes (``benchmark=coco20i benchmark.root=<COCO2014 folder> benchmark.fold=0``).

    Args:
        root: the folder holding ``val2014/``, ``train2014/`` and ``annotations/{val2014,train2014}/``.
        fold: 0-3.
        split: "val" (test protocol) or "trn" (training classes, lists built from the masks).
        shots, episodes (default 1000), seed, supports: see ``EpisodeBenchmark``.
    """

    default_episodes = 1000

    def __init__(self, root: str | None = None, fold: int = 0, split: str = "val", **kw) -> None:
        super().__init__(**kw)
        check_fold_split(fold, split, 4)
        base = require_dir(root, what="COCO2014 with HSNet's class masks",
                           layout="<root>/val2014/*.jpg and <root>/annotations/val2014/*.png",
                           source="cocodataset.org (images) and HSNet's README (masks)")
        sub = "val2014" if split == "val" else "train2014"
        for d in (base / sub, base / "annotations" / sub):
            if not d.is_dir():
                raise InputError(f"benchmark.root: no {d}; the root must hold {sub}/ and annotations/{sub}/")
        self.root, self.fold, self.split = base, int(fold), split
        self.name = f"coco20i/{split}/fold{self.fold}"
        test = fold_classes(self.fold)
        classes = test if split == "val" else [c for c in range(80) if c not in test]
        if split == "val":
            for ln in split_lines("coco20i/val.txt.gz"):
                cls, ids = ln.split("\t")
                if int(cls) in classes:
                    self.pool[int(cls)] = [f"val2014/COCO_val2014_{int(i):012d}.jpg" for i in ids.split()]
        else:
            self.pool = self._scan_masks(base / "annotations" / sub, sub, classes)
        self.pool = {c: v for c, v in self.pool.items() if len(v) >= 2}  # a support must differ from the query
        self.names = {c: CLASSES[c] for c in self.pool}
        if not self.pool:
            raise InputError(f"COCO-20i: no image of fold {fold} classes found under {base}")

    @staticmethod
    def _scan_masks(ann_dir: Path, sub: str, classes: list[int]) -> dict[int, list[str]]:
        from PIL import Image

        pool: dict[int, list[str]] = {c: [] for c in classes}
        for p in sorted(ann_dir.glob("*.png")):
            with Image.open(p) as im:
                present = np.unique(np.asarray(im))
            for v in present:
                if int(v) - 1 in pool:
                    pool[int(v) - 1].append(f"{sub}/{p.stem}.jpg")
        return pool

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[str, int]:
        classes = sorted(self.pool)
        cid = classes[int(rng.integers(len(classes)))]
        items = self.pool[cid]
        return items[int(rng.integers(len(items)))], cid

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from incontext.io import read_image

        image = read_image(self.root / item, name=f"COCO image {item}")
        path = self.root / "annotations" / Path(item).with_suffix(".png")
        if not path.is_file():
            raise InputError(f"COCO-20i: no mask {path} for {item}")
        with Image.open(path) as im:
            labels = np.asarray(im)
        if labels.shape != image.shape[:2]:
            raise InputError(f"COCO-20i: mask {path} is {labels.shape} but its image is {image.shape[:2]}")
        return image, (labels == class_id + 1).astype(np.uint8)
