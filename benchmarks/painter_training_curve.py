"""Training curve of a ``train.py experiment=painter_tiny`` run as a PNG (``incontext.train.curves``).

    python benchmarks/painter_training_curve.py runs/painter_tiny weights/painter_tiny/training_curve.png

Left panel: training loss (smooth-L1 on the painted query cell + Dice on its score, mean over each logging
window) against step. Right panel: the periodic held-out evaluation (1-shot mIoU and FB-IoU x 100 on test-split
classes, 100 episodes, seed 1) against step.
"""

from __future__ import annotations

import numpy as np

from incontext.train import curves


def draw(run) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    return curves.loss_and_eval(run, "training loss (smooth-L1 + Dice)", "held-out classes (100 episodes, seed 1)",
                                {"1-shot mIoU": "miou", "FB-IoU": "fbiou"})


def main(argv: list[str] | None = None) -> None:
    curves.main(draw, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main()
