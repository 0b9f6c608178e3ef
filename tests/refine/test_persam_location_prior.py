"""PerSAM's location prior (incontext/match/location_prior.py): the official mask-grid quirk, target
vectors,
cosine map, points and attention bias on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.errors import InputError
from incontext.match.location_prior import (
    area_mask_grid,
    attention_bias,
    foreground_features,
    location_map,
    official_mask_grid,
    select_points,
    target_embedding,
)
from tests.refine.persam_helpers import one_thread  # noqa: F401  (autouse fixture)

MEAN_R, STD_R = 123.675, 58.395


def test_official_grid_needs_nearly_all_sampled_pixels_with_perseg_red():
    # 1024 x 1024 image: one 64 x 64 grid cell = a 16 x 16 block; bilinear 1024 -> 64 reads pixels
    # 16i+7, 16i+8.
    red = np.zeros((1024, 1024), np.uint8)
    red[16:32, 16:32] = 128  # cell (1, 1) entirely
    red[16 * 3 + 7, 16 * 3 + 7] = 128  # one of the four sampled pixels of cell (3, 3)
    red[16 * 5 + 7 : 16 * 5 + 9, 16 * 5 + 7 : 16 * 5 + 9] = (
        128  # all four sampled pixels of cell (5, 5)
    )
    g = official_mask_grid(red, (64, 64))
    assert g.cells.sum() == 2 and g.cells[1, 1] and g.cells[5, 5] and not g.cells[3, 3]
    np.testing.assert_allclose(float(g.values[1, 1]), (128 - MEAN_R) / STD_R, rtol=1e-6)
    np.testing.assert_allclose(float(g.values[0, 0]), (0 - MEAN_R) / STD_R, rtol=1e-6)
    # a bool mask is painted with PerSeg's 128, so it gives the same cells
    assert torch.equal(official_mask_grid(red > 0, (64, 64)).cells, g.cells)


def test_official_grid_threshold_depends_on_red_value():
    # half of the four sampled pixels of a cell: below the ~97 % needed with 128, above the ~48.5 %
    # with 255
    red = np.zeros((1024, 1024), np.uint8)
    red[16 * 2 + 7 : 16 * 2 + 9, 16 * 2 + 7] = 1
    assert not official_mask_grid(red * 128, (64, 64)).cells[2, 2]
    assert official_mask_grid(red * 255, (64, 64)).cells[2, 2]


def test_official_grid_counts_cells_mixing_foreground_and_padding():
    # 1000 x 492 image -> 1024 x 504 input. Grid column 31 samples input columns 503 (image) and 504
    # (padding).
    red = np.zeros((1000, 492), np.uint8)
    red[:, -4:] = 128  # a thin strip on the right edge, next to the padding
    g = official_mask_grid(red, (64, 64))
    assert g.cells[:, 31].all()  # half foreground, half padding: 0.074 / 2 + 0 / 2 > 0
    assert not g.cells[:, 32:].any()  # pure padding is 0, not > 0
    # the same half coverage inside the image does not count (0.074 / 2 - 2.118 / 2 < 0)
    half = np.zeros((1024, 1024), np.uint8)
    half[:, 16 * 10 + 8 :] = 128  # cell column 10 sees one foreground and one background sample
    assert not official_mask_grid(half, (64, 64)).cells[:, 10].any()


def test_area_grid_is_the_covered_fraction():
    red = np.zeros((1024, 1024), np.uint8)
    red[:24, :16] = 1  # cell (0, 0) fully, cell (1, 0) half
    g = area_mask_grid(red, (64, 64))
    assert float(g.values[0, 0]) == 1.0 and float(g.values[1, 0]) == 0.5
    assert g.cells[0, 0] and not g.cells[1, 0]


def test_target_vectors_and_empty_mask():
    feats = torch.randn(8, 4, 5)
    cells = torch.zeros(4, 5, dtype=torch.bool)
    cells[1, 2] = cells[3, 0] = True
    local = foreground_features(feats, cells)
    assert local.shape == (2, 8)
    t = target_embedding(local)
    torch.testing.assert_close(t.raw, (feats[:, 1, 2] + feats[:, 3, 0]) / 2)
    torch.testing.assert_close(t.sim, t.raw / t.raw.norm())
    tf = target_embedding(local, sim_vector="max_mean")
    v = torch.maximum(feats[:, 1, 2], feats[:, 3, 0]) / 2 + t.raw / 2
    torch.testing.assert_close(tf.sim, v / v.norm())
    with pytest.raises(InputError, match="no foreground cell"):
        target_embedding(foreground_features(feats, torch.zeros(4, 5, dtype=torch.bool)))
    with pytest.raises(InputError, match="sim_vector"):
        target_embedding(local, sim_vector="median")


def test_location_map_points_and_bias():
    c, g = 6, 16
    feats = torch.randn(c, g, g, generator=torch.Generator().manual_seed(0))
    feats[:, 2:5, 4:7] = feats[:, 3:4, 5:6]  # a 3 x 3 plateau around cell (row 3, col 5) ...
    target = feats[:, 3, 5] / feats[:, 3, 5].norm()  # ... of the target itself (cosine 1)
    # 400 x 300 original -> 256 x 192 input (valid grid columns 0..11), padded to 256 x 256
    loc = location_map(target, feats, img_size=256, input_size=(256, 192), original_size=(400, 300))
    assert (
        loc.grid.shape == (g, g)
        and loc.lowres.shape == (4 * g, 4 * g)
        and loc.full.shape == (400, 300)
    )
    assert abs(float(loc.grid[3, 5]) - 1.0) < 1e-5
    pos, neg = select_points(loc.full)
    assert pos.shape == (1, 2) and neg.shape == (1, 2)
    x, y = pos[0]
    assert float(loc.full[y, x]) == float(loc.full.max())  # (x, y) = (column, row)
    assert float(loc.full[neg[0, 1], neg[0, 0]]) == float(loc.full.min())
    # cells rows 2..4, cols 4..6 of the padded 256 frame = input y 32..79, x 64..111 -> original y
    # 50..124, x 100..174 (first maximum of the plateau in row-major order)
    assert 50 <= y <= 125 and 100 <= x <= 175
    bias = attention_bias(loc.full, (g, g))
    assert bias.shape == (1, 1, 1, g * g)
    assert float(bias.min()) > 0 and float(bias.max()) < 1
    # Official quirk: the bias grid is the ORIGINAL-frame map resized to g x g, so for a non-square
    # image it is not aligned with the padded token grid; its maximum sits where the map's maximum
    # is, in that frame.
    row, col = divmod(int(bias.flatten().argmax()), g)
    assert abs(row - y * g / 400) <= 1.5 and abs(col - x * g / 300) <= 1.5
