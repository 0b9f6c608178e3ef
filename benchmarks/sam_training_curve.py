"""Training curve of a ``train.py experiment=sam_tiny_synthetic`` run as a PNG (``incontext.train.curves``,
drawn with OpenCV).

    python benchmarks/sam_training_curve.py runs/sam_tiny_synthetic weights/sam_tiny_synthetic/training_curve.png

Left panel: training loss (mean over each logging window) against step. Right panel: the periodic held-out
evaluation (mIoU x 100 on test-split objects: 1 click, 3 clicks, box) against step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.train import curves


def draw(run: Path) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    return curves.loss_and_eval(run, "training loss (focal x20 + dice + IoU MSE)", "held-out classes: mIoU",
                                {"1 click": "miou_1pt", "3 clicks": "miou_3pt", "box": "miou_box"})


def main(argv: list[str] | None = None) -> None:
    curves.main(draw, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main()
