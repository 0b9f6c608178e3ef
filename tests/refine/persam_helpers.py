"""Test helpers for PerSAM: a small random SAM and a single-thread fixture.

The small SAM has the tiny widths of ``configs/backbone/sam_tiny.yaml`` and a 256-pixel input (16 x
16 token grid, 64 x 64 low-res masks), so an encoder pass takes milliseconds; PerSAM takes its grid
from the features.
"""

from __future__ import annotations

import pytest
import torch

from incontext.backbones.sam import build_sam

SMALL_SAM_ARCH = dict(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    encoder_mlp_ratio=2.0,
    prompt_embed_dim=32,
    mask_in_chans=4,
    decoder_transformer_mlp_dim=64,
    decoder_transformer_num_heads=2,
    iou_head_hidden_dim=32,
    image_size=256,
)


def small_sam(seed: int = 0):
    """A seeded random ``BatchedSamPredictor`` (same weights in every process for the same seed)."""
    return build_sam("sam_tiny", arch=SMALL_SAM_ARCH, weights="random", seed=seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run these tiny-tensor tests single-threaded (on a shared 2-core machine, hand-offs dominate
    tiny ops); restore the previous setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
