"""Metrics against values computed by hand on tiny arrays (the numbers are derived in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from incontext.errors import InputError
from incontext.metrics import SegmentationMeter, boundary_iou, iou, mask_boundary


def _box(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def test_iou_basic_and_empty():
    gt = _box(4, 4, 0, 2, 0, 2)  # 4 px
    pred = _box(4, 4, 0, 2, 0, 3)  # 6 px, contains gt
    assert iou(pred, gt) == pytest.approx(4 / 6)
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # empty vs empty: correct "nothing here"
    assert iou(np.zeros((3, 3)), np.eye(3)) == 0.0
    assert iou(torch.from_numpy(pred).bool(), torch.from_numpy(gt)) == pytest.approx(4 / 6)


def test_iou_ignore_index():
    gt = _box(4, 4, 0, 2, 0, 2)
    gt[3, :] = 255  # border row
    pred = _box(4, 4, 0, 2, 0, 2)
    pred[3, :] = 1  # predicting foreground on ignored pixels costs nothing
    assert iou(pred, gt) == 1.0
    pred[3, :] = 0  # ... and predicting background there costs nothing either
    assert iou(pred, gt) == 1.0
    assert iou(pred, gt, ignore_index=None) == pytest.approx(4 / 8)  # without ignore, 255 is foreground


def test_shape_mismatch_is_input_error():
    with pytest.raises(InputError, match=r"pred: shape \(2, 2\) differs from gt shape \(3, 3\)"):
        iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_boundary_iou_hand_computed():
    gt = _box(10, 10, 2, 8, 2, 8)  # 6x6 square
    pred = _box(10, 10, 2, 8, 3, 9)  # shifted right by 1
    # diagonal 14.14: ratio 0.02 -> d = max(1, round(0.28)) = 1. Rings of 6x6 - 4x4 = 20 px each.
    # shared ring pixels: rows 2 and 7, cols 3..7 = 10 -> 10 / (20 + 20 - 10)
    assert mask_boundary(gt.astype(bool)).sum() == 20
    assert boundary_iou(pred, gt) == pytest.approx(10 / 30)
    # ratio 0.15 -> d = round(2.12) = 2: rings 36 - 4 = 32 px; overlap = 30 common px minus the 6 px of
    # rows 4-5, cols 4-6 that are inside one of the two interiors = 24 -> 24 / (32 + 32 - 24)
    assert boundary_iou(pred, gt, dilation_ratio=0.15) == pytest.approx(24 / 40)
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(np.zeros((5, 5)), np.zeros((5, 5))) == 1.0
    # the image border is a contour too (outside counts as background): full 10x10 mask -> 36 px ring
    assert mask_boundary(np.ones((10, 10), bool)).sum() == 36


def test_boundary_iou_less_forgiving_than_iou_on_large_objects():
    gt = _box(200, 200, 20, 180, 20, 180)
    pred = _box(200, 200, 22, 182, 22, 182)  # 2-px shift of a big square
    assert iou(pred, gt) > 0.95
    assert boundary_iou(pred, gt) < 0.8


def test_meter_hsnet_protocol_hand_computed():
    meter = SegmentationMeter()
    # episode A, class 1: fg I=4, U=6; bg: gt bg 12, pred bg 10 -> I=10, U=12
    assert meter.update(_box(4, 4, 0, 2, 0, 3), _box(4, 4, 0, 2, 0, 2), 1) == pytest.approx(4 / 6)
    # episode B, class 1: gt fg 2 px, empty prediction: fg I=0, U=2; bg I=14, U=16
    assert meter.update(np.zeros((4, 4)), _box(4, 4, 0, 1, 0, 2), 1) == 0.0
    # episode C, class 2: perfect, fg 8 px: fg I=U=8; bg I=U=8
    assert meter.update(_box(4, 4, 0, 2, 0, 4), _box(4, 4, 0, 2, 0, 4), 2) == 1.0
    s = meter.summary()
    # class 1: (4+0)/(6+2) = 50 %; class 2: 100 % -> mIoU 75
    assert s["per_class"] == {1: pytest.approx(50.0), 2: pytest.approx(100.0)}
    assert s["miou"] == pytest.approx(75.0)
    # FB-IoU pools over the run: fg 12/16, bg (10+14+8)/(12+16+8) = 32/36
    assert s["fbiou"] == pytest.approx(100 * (12 / 16 + 32 / 36) / 2)
    assert s["mean_episode_iou"] == pytest.approx(100 * (4 / 6 + 0 + 1) / 3)
    assert s["episodes"] == 3
    assert 0.0 <= s["boundary_iou"] <= 100.0


def test_meter_fold_classes_and_ignore():
    meter = SegmentationMeter(classes=[1, 2, 3])
    gt = _box(4, 4, 0, 2, 0, 2)
    gt[3, :] = 255
    pred = gt.copy()
    pred[pred == 255] = 1
    meter.update(pred, gt, 1)  # perfect once the border row is ignored
    meter.update(_box(4, 4, 0, 1, 0, 1), _box(4, 4, 0, 1, 0, 1), 2)
    s = meter.summary()
    # class 3 never seen: counts 0 as in HSNet -> (100 + 100 + 0) / 3
    assert s["miou"] == pytest.approx(200 / 3)
    assert s["per_class"][3] == 0.0
    # the 4 ignored pixels are in neither fg nor bg: fg 5/5, bg (8 + 15)/(8 + 15)
    assert s["fbiou"] == pytest.approx(100.0)
    with pytest.raises(InputError, match="class_id: 7 is not one of the meter's classes"):
        meter.update(pred, gt, 7)


def test_meter_multiclass_labels():
    gt = np.zeros((4, 4), np.uint8)
    gt[0, :] = 1
    gt[3, :] = 2
    pred = gt.copy()
    pred[3, :2] = 0  # class 2: I=2, U=4
    meter = SegmentationMeter(boundary=False)
    meter.update_labels(pred, gt)
    s = meter.summary()
    assert s["per_class"] == {1: 100.0, 2: pytest.approx(50.0)}
    assert s["boundary_iou"] is None


def test_empty_meter_is_nan():
    s = SegmentationMeter().summary()
    assert math.isnan(s["miou"]) and math.isnan(s["fbiou"]) and s["episodes"] == 0
