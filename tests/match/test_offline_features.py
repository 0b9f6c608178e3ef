"""Handcrafted patch features in Matcher's DINOv2 slot: grid, standardisation, interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.errors import InputError
from incontext.features.handcrafted import HandcraftedFeatures
from incontext.match.offline_features import HandcraftedPatchFeatures


def test_grid_interface_and_fixed_standardisation():
    f = HandcraftedPatchFeatures(work_size=112, patch_size=14, stats_scenes=2)
    assert (f.grid, f.patch_size, f.embed_dim) == (8, 14, HandcraftedFeatures().dim)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    x = f.normalize(imgs)
    tok = f.patch_tokens(x)["prenorm"]
    assert tok.shape == (2, 64, f.embed_dim) and tok.dtype == torch.float32
    # Token i of image b is the standardised feature of cell (i // 8, i % 8), with the fixed statistics.
    raw = HandcraftedFeatures(size=112, stride=14)(imgs[1]).float()
    expect = (raw[:, 3, 5] - f.mean) / f.std
    torch.testing.assert_close(tok[1, 3 * 8 + 5], expect)
    # Fixed statistics: one image's tokens do not depend on what else is in the batch.
    torch.testing.assert_close(f.patch_tokens(x[1:])["prenorm"][0], tok[1])


def test_errors():
    with pytest.raises(InputError, match="multiple"):
        HandcraftedPatchFeatures(work_size=100, patch_size=14, stats_scenes=1)
    f = HandcraftedPatchFeatures(work_size=56, patch_size=14, stats_scenes=1)
    with pytest.raises(InputError, match="uint8"):
        f.normalize(np.zeros((1, 56, 56, 3), np.float32))
