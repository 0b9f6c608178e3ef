"""Training curve of a ``train.py experiment=vrp_tiny`` run as a PNG (``incontext.train.curves``).

    python benchmarks/vrp_training_curve.py runs/vrp_tiny weights/vrp_tiny/training_curve.png

Left panel: training loss (BCE + Dice, mean over each logging window) against step. Right panel: the periodic
held-out evaluation (1-shot mIoU x 100 on test-split classes, mask annotations) against step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from incontext.train.curves import panel, read_csv, write_png


def draw(run: Path) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    tr, ev = read_csv(run / "train.csv"), read_csv(run / "eval.csv")
    if not tr:
        raise SystemExit(f"{run / 'train.csv'}: not found or empty; pass a train.py run folder")
    x_max = float(tr["step"].max())
    left = panel("training loss (BCE + Dice)", tr["step"], {"loss": tr.get("loss_avg", tr["loss"])}, None, x_max)
    series = {"1-shot mIoU": ev["miou"]} if "miou" in ev else {}
    right = panel("held-out classes (100 episodes, seed 1)", ev.get("step", np.zeros(0)), series, (0.0, 100.0),
                  x_max)
    return np.concatenate([left, right], 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="train.py out_dir (holds train.csv and eval.csv)")
    ap.add_argument("out", type=Path, help="PNG to write")
    args = ap.parse_args(argv)
    write_png(draw(args.run), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
