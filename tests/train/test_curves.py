"""incontext.train.curves and the training-curve scripts that use it (SAM, VRP)."""

from __future__ import annotations

import sys

import cv2
import numpy as np

from incontext.train.curves import PANEL_H, PANEL_W, panel, read_csv, write_png
from tests.conftest import REPO


def _run(tmp_path, eval_header: str, eval_row: str):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "train.csv").write_text("step,loss,loss_avg\n10,1.0,1.1\n20,0.8,0.9\n30,0.7,nan\n")
    (run / "eval.csv").write_text(f"step,{eval_header}\n0,{eval_row}\n30,{eval_row}\n")
    return run


def test_read_csv_and_panel(tmp_path):
    run = _run(tmp_path, "miou", "12.5")
    cols = read_csv(run / "train.csv")
    assert list(cols["step"]) == [10, 20, 30] and np.isnan(cols["loss_avg"][2])
    assert read_csv(tmp_path / "missing.csv") == {}
    img = panel("t", cols["step"], {"loss": cols["loss_avg"]}, None, 30)
    assert img.shape == (PANEL_H, PANEL_W, 3) and (img < 255).any()
    write_png(img, tmp_path / "a" / "p.png")
    assert cv2.imread(str(tmp_path / "a" / "p.png")).shape == img.shape


def test_vrp_and_sam_curve_scripts(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sam_training_curve
        import vrp_training_curve
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    vrp_training_curve.main([str(_run(tmp_path / "v", "miou", "20.0")), str(tmp_path / "v.png")])
    sam_training_curve.main([str(_run(tmp_path / "s", "miou_1pt,miou_3pt,miou_box", "1,2,3")),
                             str(tmp_path / "s.png")])
    for name in ("v.png", "s.png"):
        assert cv2.imread(str(tmp_path / name)).shape == (PANEL_H, 2 * PANEL_W, 3)
