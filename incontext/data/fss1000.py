"""FSS-1000 (Wei et al., CVPR 2020) with HSNet's split and episode protocol.

Layout (as HSNet reads it): ``<root>/<class>/<n>.jpg`` with its mask ``<n>.png`` (n = 1..10), 1,000 classes;
Matcher's ``FSS-1000/data/<class>/`` is accepted too. Split: HSNet's 520 train / 240 val / 240 test classes
(``splits/fss1000/{trn,val,test}.txt``, from juhongm999/hsnet; test = the dataset's own test classes).
Episodes: one per test image (2,400), in HSNet's order (classes sorted, files sorted by name); the query of
episode i is image i % 2400, its supports are ``shots`` other images of its class drawn without replacement
(HSNet draws with replacement, so its k-shot supports can repeat). Masks are thresholded at 128.
Get the data from the FSS-1000 project (github.com/HKUSTCV/FSS-1000, ``fewshot_data.zip``).
"""

from __future__ import annotations

import numpy as np

from incontext.data.files import FileBenchmark, require_dir, split_lines
from incontext.errors import InputError

SPLITS = {"trn": 0, "val": 520, "test": 760}  # HSNet's class-id offsets


class FSS1000(FileBenchmark):
    """FSS-1000 episodes (``benchmark=fss1000 benchmark.root=<FSS-1000 folder>``).

    Args:
        root: the folder holding the 1,000 class folders (or their parent ``data/``).
        split: "test" (default), "val" or "trn".
        shots, episodes (default 2400), seed, supports: see ``EpisodeBenchmark``.
    """

    default_episodes = 2400

    def __init__(self, root: str | None = None, split: str = "test", **kw) -> None:
        super().__init__(**kw)
        if split not in SPLITS:
            raise InputError(f"benchmark.split: {split!r}; pass one of {', '.join(SPLITS)}")
        base = require_dir(root, what="FSS-1000", layout="<root>/<class>/<n>.jpg + <n>.png",
                           source="github.com/HKUSTCV/FSS-1000")
        if (base / "data").is_dir() and not (base / "ab_wheel").is_dir():
            base = base / "data"
        self.root, self.split, self.name = base, split, f"fss1000/{split}"
        categories = sorted(split_lines(f"fss1000/{split}.txt"))
        missing = [c for c in categories if not (base / c).is_dir()]
        if missing:
            raise InputError(
                f"benchmark.root: {len(missing)} of the {len(categories)} FSS-1000 {split} classes are missing "
                f"under '{base}' (first: {missing[0]!r}); point benchmark.root at the folder of class folders"
            )
        for i, c in enumerate(categories):
            cid = SPLITS[split] + i
            self.names[cid] = c
            files = sorted(p.name for p in (base / c).iterdir() if p.suffix.lower() == ".jpg")
            self.pool[cid] = [f"{c}/{f}" for f in files]
            self.queries += [(f"{c}/{f}", cid) for f in files]
        self._check_nonempty()

    def _load(self, item: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        from incontext.io import read_image

        img_path = self.root / item
        mask_path = img_path.with_suffix(".png")
        if not mask_path.is_file():
            raise InputError(f"FSS-1000: no mask {mask_path} for image {img_path}")
        image = read_image(img_path, name=str(img_path))
        # FSS masks are 0/255 greys, sometimes JPEG-noisy; HSNet thresholds at 128.
        with Image.open(mask_path) as im:
            grey = np.asarray(im.convert("L"))
        mask = (grey >= 128).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise InputError(f"FSS-1000: mask {mask_path} is {mask.shape} but its image is {image.shape[:2]}")
        return image, mask


__all__ = ["FSS1000"]
