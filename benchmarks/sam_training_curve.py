"""Training curve of a ``train.py experiment=sam_tiny_synthetic`` run as a PNG (``incontext.train.curves``,
drawn with OpenCV).

    python benchmarks/sam_training_curve.py runs/sam_tiny_synthetic weights/sam_tiny_synthetic/training_curve.png

Left panel: training loss (mean over each logging window) against step. Right panel: the periodic held-out
evaluation (mIoU x 100 on test-split objects: 1 click, 3 clicks, box) against step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from incontext.train.curves import panel as _panel
from incontext.train.curves import read_csv as _read
from incontext.train.curves import write_png


def draw(run: Path) -> np.ndarray:
    """Both panels side by side, (H, 2W, 3) uint8 BGR."""
    tr, ev = _read(run / "train.csv"), _read(run / "eval.csv")
    if not tr:
        raise SystemExit(f"{run / 'train.csv'}: not found or empty; pass a train.py run folder")
    x_max = float(tr["step"].max())
    left = _panel("training loss (focal x20 + dice + IoU MSE)", tr["step"],
                  {"loss": tr.get("loss_avg", tr["loss"])}, None, x_max)
    keys = {"1 click": "miou_1pt", "3 clicks": "miou_3pt", "box": "miou_box"}
    series = {k: ev[v] for k, v in keys.items() if v in ev}
    right = _panel("held-out classes: mIoU", ev.get("step", np.zeros(0)), series, (0.0, 100.0), x_max)
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
