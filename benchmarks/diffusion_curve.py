"""Training curve of a ``train.py experiment=diffusion_tiny`` run as a PNG (OpenCV drawing; no plotting library).

    python benchmarks/diffusion_curve.py runs/diffusion_tiny weights/diffusion_tiny/training_curve.png

Left: training loss (BCE + Dice + prior BCE, mean over each logging window) and the auxiliary prior BCE.
Middle: IoU of the one-step (t = 1) predictions on the training batches. Right: held-out mIoU (novel test
classes, 1-shot, steps = 1, seed 1) from the periodic evaluation.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

PW, PH, MARGIN = 420, 320, 48
BGR = [(180, 80, 20), (30, 140, 230), (40, 150, 40)]


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a ``train.csv`` / ``eval.csv`` as float arrays (blank -> NaN)."""
    if not path.is_file():
        return {}
    cols: dict[str, list[float]] = {}
    for row in csv.DictReader(path.open()):
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return {k: np.asarray(v) for k, v in cols.items()}


def smooth(v: np.ndarray, n: int = 5) -> np.ndarray:
    """Running mean over ``n`` points ignoring NaNs."""
    out = np.full_like(v, np.nan)
    for i in range(len(v)):
        w = v[max(0, i - n + 1): i + 1]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = w.mean()
    return out


def panel(title: str, x: np.ndarray, series: dict[str, np.ndarray], x_max: float,
          y_range: tuple[float, float] | None = None) -> np.ndarray:
    img = np.full((PH, PW, 3), 255, np.uint8)
    x0, y0, x1, y1 = MARGIN, 28, PW - 12, PH - MARGIN
    finite = [v[np.isfinite(v)] for v in series.values()]
    vals = np.concatenate(finite) if finite and sum(map(len, finite)) else np.zeros(1)
    lo, hi = y_range or (float(vals.min()), float(vals.max()))
    hi = hi if hi - lo > 1e-9 else lo + 1.0
    px = lambda v: int(round(x0 + (x1 - x0) * v / max(x_max, 1.0)))  # noqa: E731
    py = lambda v: int(round(y1 - (y1 - y0) * (v - lo) / (hi - lo)))  # noqa: E731
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in np.linspace(lo, hi, 5):
        cv2.line(img, (x0, py(t)), (x1, py(t)), (230, 230, 230), 1)
        cv2.putText(img, f"{t:.2f}" if hi - lo < 5 else f"{t:.0f}", (2, py(t) + 4), font, 0.36, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for t in np.linspace(0, x_max, 5):
        cv2.putText(img, str(int(t)), (px(t) - 12, y1 + 16), font, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    cv2.putText(img, title, (x0, 18), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "step", ((x0 + x1) // 2 - 14, PH - 10), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, v) in enumerate(series.items()):
        colour = BGR[i % len(BGR)]
        ok = np.isfinite(v)
        pts = np.array([(px(a), py(b)) for a, b in zip(x[ok], v[ok])], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        for p in pts if len(pts) < 40 else []:
            cv2.circle(img, tuple(int(c) for c in p), 3, colour, -1, cv2.LINE_AA)
        cv2.putText(img, name, (x1 - 150, y0 + 16 + 16 * i), font, 0.4, colour, 1, cv2.LINE_AA)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="train.py out_dir (train.csv, eval.csv)")
    ap.add_argument("out", type=Path, help="PNG to write")
    args = ap.parse_args()
    tr, ev = read_csv(args.run / "train.csv"), read_csv(args.run / "eval.csv")
    if not tr:
        raise SystemExit(f"{args.run / 'train.csv'}: not found; pass a train.py run folder")
    x_max = float(max(tr["step"].max(), ev["step"].max() if ev else 0))
    left = panel("train loss", tr["step"], {"loss": tr["loss_avg"],
                                            "prior BCE": smooth(tr.get("prior_bce", tr["loss"] * np.nan))},
                 x_max)
    mid = panel("train IoU, one step (t=1)", tr["step"], {"IoU x100": 100 * smooth(tr["iou_t1"])}, x_max,
                (0.0, 100.0))
    right = panel("held-out mIoU (test classes, 1-shot)", ev["step"] if ev else np.zeros(0),
                  {"mIoU": ev["miou"] if ev else np.zeros(0)}, x_max, (0.0, 100.0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from incontext.io import atomic_path

    with atomic_path(args.out) as tmp:
        if not cv2.imwrite(str(tmp), np.concatenate([left, mid, right], axis=1)):
            raise SystemExit(f"{args.out}: could not write the PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
