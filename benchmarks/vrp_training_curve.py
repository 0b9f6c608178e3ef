"""Training curve of a ``train.py experiment=vrp_tiny`` run as a PNG (``incontext.train.curves``).

    python benchmarks/vrp_training_curve.py runs/vrp_tiny weights/vrp_tiny/training_curve.png

Left panel: training loss (BCE + Dice, + the location BCE of a ``prior_click`` head; mean over each logging
window) against step. Right panel: the periodic
held-out evaluation (1-shot mIoU x 100 on test-split classes, mask annotations) against step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.train import curves


def draw(run: Path) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    return curves.loss_and_eval(run, "training loss (BCE + Dice + location)", "held-out classes (100 episodes, seed 1)",
                                {"1-shot mIoU": "miou"})


def main(argv: list[str] | None = None) -> None:
    curves.main(draw, __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main()
