"""Training curve of a ``train.py experiment=diffusion_tiny`` run as a PNG (drawn by ``incontext.train.curves``).

    python benchmarks/diffusion_curve.py runs/diffusion_tiny weights/diffusion_tiny/training_curve.png

Left: training loss (BCE + Dice + prior BCE, mean over each logging window) and the auxiliary prior BCE.
Middle: IoU of the one-step (t = 1) predictions on the training batches. Right: held-out mIoU (novel test
classes, 1-shot, steps = 1, seed 1) from the periodic evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.train.curves import main, panel, read_csv


def smooth(v: np.ndarray, n: int = 5) -> np.ndarray:
    """Running mean over ``n`` logged points, ignoring NaNs (the per-window IoU is noisy)."""
    out = np.full_like(v, np.nan)
    for i in range(len(v)):
        w = v[max(0, i - n + 1): i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def draw(run: Path) -> np.ndarray:
    """The three panels of a diffusion run side by side."""
    tr, ev = read_csv(run / "train.csv"), read_csv(run / "eval.csv")
    if not tr:
        raise SystemExit(f"{run / 'train.csv'}: not found; pass a train.py run folder")
    x_max = float(max(tr["step"].max(), ev["step"].max() if ev else 0))
    prior = smooth(tr.get("prior_bce", tr["loss"] * np.nan))
    left = panel("train loss", tr["step"], {"loss": tr["loss_avg"], "prior BCE": prior}, None, x_max)
    mid = panel("train IoU, one step (t=1)", tr["step"], {"IoU x100": 100 * smooth(tr["iou_t1"])}, (0.0, 100.0),
                x_max)
    right = panel("held-out mIoU (test classes, 1-shot)", ev.get("step", np.zeros(0)),
                  {"mIoU": ev.get("miou", np.zeros(0))}, (0.0, 100.0), x_max)
    return np.concatenate([left, mid, right], axis=1)


if __name__ == "__main__":
    main(draw, __doc__)
