"""Matcher's patch rule and bidirectional matching on small hand-built inputs."""

from __future__ import annotations

import numpy as np
import torch

from incontext.match.bidirectional import (
    bidirectional_match,
    cpython_set_order,
    l2_normalise,
    patch_centres,
    patch_foreground,
    points_box,
)


def test_patch_rule_any_pixel():
    m = torch.zeros(1, 28, 42, dtype=torch.bool)
    m[0, 13, 0] = True  # one pixel in patch (0, 0)
    m[0, 14, 41] = True  # one pixel in patch (1, 2)
    fg = patch_foreground(m, 14)
    expected = torch.zeros(1, 2, 3, dtype=torch.bool)
    expected[0, 0, 0] = expected[0, 1, 2] = True
    assert torch.equal(fg, expected)


def test_patch_rule_empty_fallback_paints_centre_of_every_shot():
    fg = patch_foreground(torch.zeros(2, 518, 518, dtype=torch.bool), 14)
    # 14x14 square at rows/cols 252..265: patches 18 (252..265 lies in 252..265 = patch 18) only
    assert fg.sum() == 2 and bool(fg[:, 18, 18].all())
    # a non-empty shot disables the fallback for all shots
    m = torch.zeros(2, 518, 518, dtype=torch.bool)
    m[1, 0, 0] = True
    fg = patch_foreground(m, 14)
    assert fg[0].sum() == 0 and fg[1].sum() == 1


def test_patch_centres_and_box():
    pts = patch_centres(np.array([0, 1, 37, 1368]), 37, 14)
    np.testing.assert_array_equal(pts, [[7, 7], [21, 7], [7, 21], [511, 511]])
    np.testing.assert_array_equal(points_box(pts, (518, 518)), [7, 7, 511, 511])


def test_cpython_set_order_is_literal():
    values = [1368, 5, 37, 5, 900, 74, 1368]
    assert cpython_set_order(values) == list(set(values))


def _tokens(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(n, c, generator=g))


def test_identical_images_match_themselves():
    """Support == query: every foreground patch matches itself both ways, all pairs are kept."""
    grid = 6
    q = _tokens(grid * grid, 16, 0)
    fg = torch.zeros(grid * grid, dtype=torch.bool)
    fg[[7, 8, 14, 20]] = True
    r = bidirectional_match(q.clone(), q, fg, grid=grid, patch_size=14, image_size=(84, 84))
    np.testing.assert_array_equal(r.forward_cols, [7, 8, 14, 20])
    np.testing.assert_array_equal(r.reverse_cols, [7, 8, 14, 20])
    assert r.retain.all() and not r.fallback_keep_all
    assert r.reduced_points_num == 4  # <= 40 pairs: no halving
    assert sorted(r.points_target_indices.tolist()) == [7, 8, 14, 20]
    np.testing.assert_array_equal(r.points_xy, patch_centres(r.points_target_indices, grid, 14))
    np.testing.assert_allclose(r.cost.numpy(), ((1 - r.similarity) / 2).numpy())


def test_reverse_filter_and_fallback():
    """The query patch matched to the only foreground support patch prefers a background support patch in
    the reverse direction: it is not retained, and as nothing is retained every forward pair is kept."""
    q = _tokens(9, 8, 1)
    s = _tokens(9, 8, 2)
    s[5] = q[4]  # background support patch 5 is exactly query patch 4
    s[0] = l2_normalise(q[4] + 0.05 * _tokens(1, 8, 3)[0])  # the foreground patch is close to it
    fg = torch.zeros(9, dtype=torch.bool)
    fg[0] = True
    r = bidirectional_match(s, q, fg, grid=3, patch_size=14, image_size=(42, 42))
    assert r.forward_cols.tolist() == [4]
    assert r.reverse_cols.tolist() == [5]
    assert r.retain.tolist() == [False] and r.fallback_keep_all
    assert r.kept_cols.tolist() == [4] and r.points_xy.tolist() == [[21, 21]]
    # with the foreground patch itself as the closest reverse partner the pair is retained
    s[5] = _tokens(1, 8, 4)[0]
    r = bidirectional_match(s, q, fg, grid=3, patch_size=14, image_size=(42, 42))
    assert r.reverse_cols.tolist() == [0] and r.retain.tolist() == [True] and not r.fallback_keep_all


def test_top_half_rule_and_sort_order():
    grid = 10
    n = 60
    q = _tokens(grid * grid, 32, 2)
    fg = torch.zeros(grid * grid, dtype=torch.bool)
    fg[:n] = True
    noise = torch.randn(grid * grid, 32, generator=torch.Generator().manual_seed(3)) * 0.2
    s = l2_normalise(q + noise)
    r = bidirectional_match(s, q, fg, grid=grid, patch_size=14, image_size=(140, 140))
    k = len(r.kept_sim)
    assert r.reduced_points_num == (k // 2 if k > 40 else k)
    _, order = torch.sort(torch.from_numpy(r.kept_sim), descending=True)
    np.testing.assert_array_equal(r.sort_order, order.numpy())
    np.testing.assert_array_equal(r.top_target_indices_sorted, r.kept_cols[order[: r.reduced_points_num]])
    assert r.points_target_indices.tolist() == list(set(r.top_target_indices_sorted.tolist()))


def test_overrides_replay_decisions():
    grid = 4
    q = _tokens(16, 8, 4)
    s = _tokens(16, 8, 5)
    fg = torch.ones(16, dtype=torch.bool)
    r = bidirectional_match(s, q, fg, grid=grid, patch_size=14, image_size=(56, 56))
    rows = r.forward_rows
    cols = np.roll(r.forward_cols, 1)
    r2 = bidirectional_match(s, q, fg, grid=grid, patch_size=14, image_size=(56, 56),
                             forward_override=(rows, cols))
    np.testing.assert_array_equal(r2.forward_cols, cols)
    np.testing.assert_allclose(r2.forward_sim, r.similarity.numpy()[rows, cols])
