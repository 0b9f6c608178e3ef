"""Every backbone config builds through the same code path; tiny ones run, full-size ones build on meta."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.backbones import available_backbones, backbone_config, build_backbone
from incontext.backbones.dinov2 import DINOV2_ARCHS, DinoFeatures, DinoV2Arch, DinoV2ViT, parse_name
from incontext.backbones.sam import SAM_ARCHS, BatchedSamPredictor, build_sam_model
from incontext.errors import InputError


def test_configs_present():
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_tiny",
            "sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_tiny"} <= set(available_backbones())
    with pytest.raises(InputError, match="did you mean sam_tiny"):
        backbone_config("sam_tiny2")


def test_dinov2_tiny_config_runs_and_is_seeded():
    a = build_backbone("dinov2_tiny")
    b = build_backbone("dinov2_tiny", seed=1)
    assert isinstance(a, DinoFeatures) and a.arch.grid == 37 and a.name.startswith("dinov2_tiny@seed0-")
    x = a.normalize(np.full((1, 28, 42, 3), 127, np.uint8))
    ta, tb = a.patch_tokens(x)["prenorm"], b.patch_tokens(x)["prenorm"]
    assert ta.shape == (1, 6, 64) and not torch.allclose(ta, tb)
    torch.testing.assert_close(ta, build_backbone("dinov2_tiny").patch_tokens(x)["prenorm"])


def test_sam_tiny_config_runs():
    pred = build_backbone("sam_tiny")
    assert isinstance(pred, BatchedSamPredictor)
    assert sum(p.numel() for p in pred.model.parameters()) < 300_000
    emb = pred.embed(np.zeros((32, 48, 3), np.uint8))
    assert emb.features.shape == (1, 32, 64, 64) and emb.input_size == (683, 1024)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"])
def test_full_size_dinov2_configs_describe_official_sizes(name):
    cfg = backbone_config(name)
    base, regs = parse_name(cfg.name)
    with torch.device("meta"):
        model = DinoV2ViT(DINOV2_ARCHS[base])
    n = sum(p.numel() for p in model.parameters())
    # parameter counts of upstream facebookresearch/dinov2 vit_small/base/large/giant2 (patch 14, img 518,
    # ViT-g with ffn_layer="swiglufused"), counted once from the upstream classes
    expected = {"vits14": 22_056_576, "vitb14": 86_580_480, "vitl14": 304_368_640, "vitg14": 1_136_480_768}[base]
    assert n == expected
    assert cfg.weights is None and regs == 0


@pytest.mark.parametrize("key", ["vit_b", "vit_l", "vit_h"])
def test_full_size_sam_configs(key):
    cfg = backbone_config(f"sam_{key}")
    assert cfg.name == f"sam_{key}" and cfg.weights is None
    with torch.device("meta"):
        n = sum(p.numel() for p in build_sam_model(SAM_ARCHS[key]).parameters())
    # the same counts as segment_anything's own registry builders (asserted equal layout in test_sam.py)
    expected = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}[key]
    assert n == expected


def test_dinov2_tiny_arch_matches_reference_recipe():
    cfg = backbone_config("dinov2_tiny")
    a = DinoV2Arch(**cfg.arch)
    assert (a.embed_dim, a.depth, a.num_heads, a.grid) == (64, 2, 2, 37)
