"""Matcher's instance-level scoring and selection against direct computations of the released formulas."""

from __future__ import annotations

import cv2
import numpy as np
import ot
import pytest
import torch

from incontext.refine import instance_scoring as isc


def _random_masks(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
        masks[i, y0 : y0 + rng.integers(1, h - y0), x0 : x0 + rng.integers(1, w - x0)] = True
    return masks


@pytest.mark.parametrize("hw", [(70, 84), (75, 81)], ids=["multiple", "cv2-path"])
def test_masks_to_grid_equals_inter_area(hw):
    masks = _random_masks(12, *hw, seed=0)
    masks[3] = False  # all-empty -> every cell on
    cells, empty = isc.masks_to_grid(torch.from_numpy(masks), 7)
    for i, m in enumerate(masks):
        r = cv2.resize(m.astype(np.float32), (7, 7), interpolation=cv2.INTER_AREA)
        expected = r > (r.max() - 1e-6 if r.max() <= 0 else 0)
        np.testing.assert_array_equal(cells[i], expected, err_msg=f"mask {i}")
    assert empty.tolist() == [i == 3 for i in range(12)]


def test_emd_scores_equal_direct_ot_calls_and_dedup_threads():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((30 + 49, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cost = (1 - feats[:30] @ feats[30:].T) / 2
    cells = rng.random((9, 7, 7)) > 0.6
    cells[4] = cells[1]  # duplicate pattern
    cells[:, 0, 0] = True
    emd32, emd64 = isc.emd_scores(cost, cells, workers=1)
    for i, c in enumerate(cells):
        sub = cost[:, c.reshape(-1)]
        direct = 1 - ot.emd2([1.0 / 30] * 30, [1.0 / sub.shape[1]] * sub.shape[1], sub)
        assert emd64[i] == direct
        assert emd32[i] == np.float32(direct)
    emd32_t, emd64_t = isc.emd_scores(cost, cells, workers=3)
    np.testing.assert_array_equal(emd64_t, emd64)


def test_points_inside_truncates_and_clips():
    m = np.zeros((1, 10, 20), dtype=bool)
    m[0, 9, 19] = True
    m[0, 0, 3] = True
    pts = np.array([[19.9, 9.9], [25, 30], [3, 0], [3.7, 0.2], [0, 0], [-4, -4]])
    np.testing.assert_array_equal(isc.points_inside(m, pts)[0], [True, True, True, True, False, False])


def test_purity_coverage_and_scores_follow_float32_formula():
    n_inside = np.array([0, 3, 10])
    area = np.array([0, 6, 1369])
    purity, coverage = isc.purity_coverage(n_inside, area, 10)
    for i in range(3):
        p = torch.tensor([int(n_inside[i]) / max(float(area[i]), 1.0)]) + 1e-6  # Python floats, as released
        c = torch.tensor([int(n_inside[i]) / 10]) + 1e-6
        assert purity[i] == p[0] and coverage[i] == c[0]
    emd = torch.tensor([0.5, 0.6, 0.7])
    s = isc.combine_scores(emd, purity, coverage, 0.8, 0.2, 1.0)
    assert torch.equal(s, 0.8 * emd + 0.2 * purity * coverage**1.0)


def test_metric_filters_use_min_of_threshold_and_max():
    emd = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    purity = np.array([0.01, 0.015, 0.012, 0.005], np.float32)  # all below 0.02: max survives
    coverage = np.array([0.5, 0.4, 0.3, 0.2], np.float32)
    cfg = isc.MetricFilters(purity=0.02, use_score_filter=True, num_merging_mask=9)
    sel = isc.select(emd, purity, coverage, emd, cfg)
    assert sel.after_metric_filters.tolist() == [1]
    assert sel.metric_filters == [{"metric": "purity", "cfg": 0.02, "threshold": pytest.approx(0.015), "kept": 1}]
    cfg = isc.MetricFilters(coverage=0.3, emd=0.75, use_score_filter=False, num_merging_mask=5,
                            topk_scores_threshold=0.0)
    sel = isc.select(emd, purity, coverage, emd, cfg)
    assert sel.after_metric_filters.tolist() == [0, 1]
    assert [f["metric"] for f in sel.metric_filters] == ["coverage", "emd"]


def test_score_filter_path_forces_best_and_normalises_by_max():
    scores = np.array([0.5, 0.95, 0.9, 0.2, 0.94], np.float32)
    cfg = isc.MetricFilters(use_score_filter=True, score=0.33, score_norm=0.1, num_merging_mask=2)
    sel = isc.select(scores, scores, scores, scores, cfg)
    d = 1 - torch.from_numpy(scores)
    ds, rank = torch.sort(d)
    norm = (ds - ds.min()) / (ds.max() + 1e-6)
    np.testing.assert_array_equal(sel.extras["ranked"], rank.numpy())
    np.testing.assert_array_equal(sel.extras["distances_norm"], norm.numpy())
    assert sel.selected.tolist() == [1, 4]  # 0.95, 0.94 (0.9 passes too but only 2 are merged)
    low = np.array([0.1, 0.2], np.float32)  # every distance >= 0.33: the best is still kept
    assert isc.select(low, low, low, low, cfg).selected.tolist() == [1]


def test_topk_path_ties_follow_torch_topk():
    scores = np.array([0.5, 0.9, 0.9, 0.9, 0.1, 0.9], np.float32)
    cfg = isc.MetricFilters(num_merging_mask=2, topk_scores_threshold=0.7)
    sel = isc.select(scores, scores, scores, scores, cfg)
    expected = torch.from_numpy(scores).topk(2)[1].numpy()
    np.testing.assert_array_equal(sel.extras["topk"], expected)
    np.testing.assert_array_equal(sel.selected, expected)
    # normalisation by the max only when the threshold is > 0
    cfg0 = isc.MetricFilters(num_merging_mask=6, topk_scores_threshold=0.0)
    sel0 = isc.select(scores, scores, scores, scores, cfg0)
    np.testing.assert_array_equal(sel0.extras["topk_scores_normalised"], sel0.extras["topk_scores"])
    assert len(sel0.selected) == 6
    sel7 = isc.select(scores, scores, scores, scores, isc.MetricFilters(num_merging_mask=6))
    assert sorted(sel7.selected.tolist()) == [1, 2, 3, 5]  # 0.5 / 0.9 = 0.56 < 0.7


def test_union_and_score_candidates_shapes():
    masks = torch.from_numpy(_random_masks(4, 28, 28, seed=2))
    rng = np.random.default_rng(3)
    cost = rng.random((5, 4)).astype(np.float32)
    points = np.array([[3, 3], [20, 20], [10, 25]])
    sc = isc.score_candidates(masks, cost, points, grid=2, alpha=1.0, beta=0.0, exp=0.0)
    assert sc.mask37.shape == (4, 2, 2) and sc.points_inside.shape == (4, 3)
    np.testing.assert_array_equal(sc.score, sc.emd)
    assert torch.equal(isc.union(masks, np.array([0, 2])), masks[0] | masks[2])
    assert not isc.union(masks, np.zeros(0, np.int64)).any()
