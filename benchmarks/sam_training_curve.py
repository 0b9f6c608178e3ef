"""Training curve of a ``train.py experiment=sam_tiny_synthetic`` run as a PNG (drawn with OpenCV, no plotting
library needed).

    python benchmarks/sam_training_curve.py runs/sam_tiny_synthetic weights/sam_tiny_synthetic/training_curve.png

Left panel: training loss (mean over each logging window) against step. Right panel: the periodic held-out
evaluation (mIoU x 100 on test-split objects: 1 click, 3 clicks, box) against step.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

W, H, M = 520, 360, 56  # panel size and margin (pixels)
COLOURS = [(200, 70, 30), (40, 150, 40), (30, 60, 200), (150, 40, 150)]  # BGR


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(path.open()))
    out: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                out.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                out.setdefault(k, []).append(float("nan"))
    return {k: np.asarray(v) for k, v in out.items()}


def _panel(title: str, x: np.ndarray, series: dict[str, np.ndarray], y_range: tuple[float, float] | None,
           x_max: float) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    x0, y0, x1, y1 = M, 24, W - 16, H - M + 10
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    vals = np.concatenate([v[np.isfinite(v)] for v in series.values()]) if series else np.zeros(1)
    lo, hi = y_range if y_range else (float(vals.min()), float(vals.max()))
    if hi - lo < 1e-9:
        hi = lo + 1.0
    fx = lambda v: int(x0 + (x1 - x0) * v / max(x_max, 1))  # noqa: E731
    fy = lambda v: int(y1 - (y1 - y0) * (v - lo) / (hi - lo))  # noqa: E731
    for t in np.linspace(lo, hi, 5):
        cv2.line(img, (x0, fy(t)), (x1, fy(t)), (225, 225, 225), 1)
        cv2.putText(img, f"{t:.2f}" if hi - lo < 10 else f"{t:.0f}", (4, fy(t) + 4), cv2.FONT_HERSHEY_SIMPLEX,
                    0.38, (0, 0, 0), 1, cv2.LINE_AA)
    for t in np.linspace(0, x_max, 5):
        cv2.putText(img, f"{int(t)}", (fx(t) - 10, y1 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(img, "step", ((x0 + x1) // 2 - 12, H - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(img, title, (x0, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, v) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        ok = np.isfinite(v)
        pts = np.array([[fx(a), fy(b)] for a, b in zip(x[ok], v[ok])], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, c, 2, cv2.LINE_AA)
        for p in pts if len(pts) < 30 else []:
            cv2.circle(img, tuple(int(t) for t in p), 3, c, -1, cv2.LINE_AA)
        cv2.putText(img, name, (x0 + 10, y0 + 18 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, c, 1, cv2.LINE_AA)
    return img


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
    img = draw(args.run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp.png")
    cv2.imwrite(str(tmp), img)
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
