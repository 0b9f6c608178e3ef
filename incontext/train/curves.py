"""Training-curve PNGs of ``train.py`` runs, drawn with OpenCV (no plotting library needed).

Shared by the per-model scripts (``benchmarks/sam_training_curve.py``, ``benchmarks/vrp_training_curve.py``):
:func:`read_csv` reads a run's ``train.csv`` / ``eval.csv`` into columns, :func:`panel` draws one line chart
against the step, :func:`write_png` writes atomically.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

__all__ = ["PANEL_H", "PANEL_W", "loss_and_eval", "main", "panel", "read_csv", "write_png"]

PANEL_W, PANEL_H, MARGIN = 520, 360, 56  # panel size and margin (pixels)
COLOURS = [(200, 70, 30), (40, 150, 40), (30, 60, 200), (150, 40, 150)]  # BGR


def read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV with a header row as float arrays (non-numbers -> NaN); {} if the file is missing."""
    if not path.is_file():
        return {}
    out: dict[str, list[float]] = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                try:
                    out.setdefault(k, []).append(float(v))
                except (TypeError, ValueError):
                    out.setdefault(k, []).append(float("nan"))
    return {k: np.asarray(v) for k, v in out.items()}


def panel(title: str, x: np.ndarray, series: dict[str, np.ndarray], y_range: tuple[float, float] | None,
          x_max: float) -> np.ndarray:
    """One (PANEL_H, PANEL_W, 3) uint8 BGR line chart of ``series`` (name -> values at steps ``x``); ``y_range``
    None = the data's range."""
    w, h, m = PANEL_W, PANEL_H, MARGIN
    img = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = m, 24, w - 16, h - m + 10
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    vals = np.concatenate([v[np.isfinite(v)] for v in series.values()]) if series else np.zeros(1)
    if vals.size == 0:
        vals = np.zeros(1)
    lo, hi = y_range if y_range else (float(vals.min()), float(vals.max()))
    if hi - lo < 1e-9:
        hi = lo + 1.0
    fx = lambda v: int(x0 + (x1 - x0) * v / max(x_max, 1))
    fy = lambda v: int(y1 - (y1 - y0) * (v - lo) / (hi - lo))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in np.linspace(lo, hi, 5):
        cv2.line(img, (x0, fy(t)), (x1, fy(t)), (225, 225, 225), 1)
        cv2.putText(img, f"{t:.2f}" if hi - lo < 10 else f"{t:.0f}", (4, fy(t) + 4), font, 0.38, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for t in np.linspace(0, x_max, 5):
        cv2.putText(img, f"{int(t)}", (fx(t) - 10, y1 + 16), font, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "step", ((x0 + x1) // 2 - 12, h - 12), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, title, (x0, 16), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, v) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        ok = np.isfinite(v)
        pts = np.array([[fx(a), fy(b)] for a, b in zip(x[ok], v[ok])], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, c, 2, cv2.LINE_AA)
        for p in pts if len(pts) < 30 else []:
            cv2.circle(img, tuple(int(t) for t in p), 3, c, -1, cv2.LINE_AA)
        cv2.putText(img, name, (x0 + 10, y0 + 18 + 16 * i), font, 0.42, c, 1, cv2.LINE_AA)
    return img


def write_png(img: np.ndarray, out: Path) -> None:
    """Write ``img`` (BGR) to ``out`` atomically (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"could not write {tmp}")
    tmp.replace(out)


def loss_and_eval(run: Path, loss_title: str, eval_title: str, eval_columns: dict[str, str]) -> np.ndarray:
    """The usual figure of a run folder: training loss (left) and held-out evaluation columns (right, 0-100),
    side by side, (H, 2W, 3) uint8 BGR. ``eval_columns`` maps legend labels to ``eval.csv`` columns."""
    tr, ev = read_csv(run / "train.csv"), read_csv(run / "eval.csv")
    if not tr:
        raise SystemExit(f"{run / 'train.csv'}: not found or empty; pass a train.py run folder")
    x_max = float(tr["step"].max())
    left = panel(loss_title, tr["step"], {"loss": tr.get("loss_avg", tr["loss"])}, None, x_max)
    series = {label: ev[col] for label, col in eval_columns.items() if col in ev}
    right = panel(eval_title, ev.get("step", np.zeros(0)), series, (0.0, 100.0), x_max)
    return np.concatenate([left, right], 1)


def main(draw, description: str, argv: list[str] | None = None) -> None:
    """Command line of the per-model curve scripts: ``<script> RUN_DIR OUT.png``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("run", type=Path, help="train.py out_dir (holds train.csv and eval.csv)")
    ap.add_argument("out", type=Path, help="PNG to write")
    args = ap.parse_args(argv)
    write_png(draw(args.run), args.out)
    print(f"wrote {args.out}")
