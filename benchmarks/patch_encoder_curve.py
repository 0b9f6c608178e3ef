"""Training curve of a ``train.py experiment=patch_encoder_tiny`` run as a PNG (``incontext.train.curves``).

    python benchmarks/patch_encoder_curve.py runs/patch_encoder_tiny weights/patch_encoder_tiny/training_curve.png

Left panel: training loss (BCE of the nearest-support-foreground matching decision, both directions; mean over each
logging window). Right panel: the periodic held-out read-out, ``prototype`` on the encoder's features (1-shot mIoU
on test-split classes, 100 episodes, seed 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.train import curves


def draw(run: Path) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    return curves.loss_and_eval(run, "training loss (matching BCE)", "held-out classes, prototype read-out",
                                {"1-shot mIoU": "miou"})


if __name__ == "__main__":
    curves.main(draw, __doc__.split("\n\n")[0])
