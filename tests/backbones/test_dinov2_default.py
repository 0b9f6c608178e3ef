"""Matcher's offline patch features: DINOv2 when found or configured, else the shipped patch encoder or the shipped
SAM's encoder, said once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import incontext.backbones.dinov2_default as dd
import incontext.backbones.sam_shipped as shipped
from incontext.backbones.dinov2 import DinoFeatures
from incontext.backbones.sam import BatchedSamPredictor, SamArch, build_sam_model
from incontext.errors import InputError, WeightsNotFoundError
from incontext.train.sam_task import save_sam_folder

ARCH = SamArch(image_size=64, vit_patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
               encoder_global_attn_indexes=(1,), encoder_window_size=4, encoder_mlp_ratio=2.0, prompt_embed_dim=32,
               mask_in_chans=8, decoder_transformer_mlp_dim=64, decoder_transformer_num_heads=2,
               iou_head_hidden_dim=32)


@pytest.fixture()
def places(tmp_path, monkeypatch):
    """Search places = one folder; no released DINOv2 file is ever found there."""
    monkeypatch.setattr(shipped, "search_dirs", lambda: [tmp_path / "w"])
    monkeypatch.setattr(dd, "search_dirs", lambda: [tmp_path / "w"])
    monkeypatch.setattr(dd, "find", lambda name, path=None: (None, [str(tmp_path / "w" / f"{name}.pth")]))
    monkeypatch.setattr(dd, "_announced", set())
    return tmp_path / "w"


def test_fallback_is_the_shipped_encoder_on_dinov2_grid(places, capsys):
    torch.manual_seed(0)
    sam = build_sam_model(ARCH)  # 64 px input, 8 x 8 tokens
    save_sam_folder(sam, ARCH, places / shipped.SHIPPED_NAME)
    feats = dd.build_default_dinov2("dinov2_vitl14", weights_key="dinov2.weights")
    assert isinstance(feats, dd.GridSamFeatures) and feats.patch_size == 14 and feats.grid == 37
    imgs = np.random.default_rng(0).integers(0, 255, (2, 518, 518, 3), dtype=np.uint8)
    x = feats.normalize(imgs)
    tok = feats.patch_tokens(x)["prenorm"]
    assert tok.shape == (2, 37 * 37, 32)
    with torch.no_grad():  # the trained encoder's neck map (same weights), bilinearly resampled, row-major
        ref = F.interpolate(sam.image_encoder(x), size=(37, 37), mode="bilinear", align_corners=False)
    torch.testing.assert_close(tok, ref.flatten(2).transpose(1, 2))
    dd.build_default_dinov2("dinov2_vitl14")  # said once per process and name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shipped.SHIPPED_NAME in err[0] and "dinov2.weights" in err[0]


def test_no_fallback_when_configured_disabled_or_nothing_shipped(places):
    with pytest.raises(WeightsNotFoundError, match="dinov2_vitl14"):  # nothing shipped: DINOv2's own error
        dd.build_default_dinov2("dinov2_vitl14")
    save_sam_folder(build_sam_model(ARCH), ARCH, places / shipped.SHIPPED_NAME)
    with pytest.raises(WeightsNotFoundError):  # fallback off
        dd.build_default_dinov2("dinov2_vitl14", fallback=None)
    with pytest.raises(WeightsNotFoundError):  # an explicit path is never replaced
        dd.build_default_dinov2("dinov2_vitl14", weights=places / "nope.pth")
    tiny = dict(embed_dim=64, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=14, img_size=518, init_values=1.0)
    feats = dd.build_default_dinov2("dinov2_tiny", arch=tiny, weights="random", source="incontext")
    assert isinstance(feats, DinoFeatures)  # build_dinov2 itself


def test_grid_features_reject_bad_geometry():
    sam = BatchedSamPredictor(build_sam_model(ARCH))
    with pytest.raises(InputError, match="multiple"):
        dd.GridSamFeatures(sam, work_size=520, patch_size=14)


def test_matcher_configs_use_the_offline_defaults():
    from incontext.registry import compose_method

    for name in ("matcher_fss", "matcher_coco", "matcher_lvis", "matcher_part"):
        node = compose_method(name)
        assert node.dinov2._target_.endswith("build_default_dinov2") and node.dinov2.name == "dinov2_vitl14"
        assert node.sam._target_.endswith("build_default_sam") and node.sam.name == "sam_vit_h"
    for name in ("persam", "persam_f"):
        assert compose_method(name).sam._target_.endswith("build_default_sam")


def test_fallback_prefers_the_shipped_patch_encoder(places, capsys):
    from incontext.features.learned import SHIPPED_NAME as LEARNED
    from incontext.features.learned import (
        LearnedPatchFeatures,
        PatchEncoder,
        PatchEncoderConfig,
    )

    torch.manual_seed(0)
    save_sam_folder(build_sam_model(ARCH), ARCH, places / shipped.SHIPPED_NAME)
    enc = PatchEncoder(PatchEncoderConfig(grid=37, stem=(4, 4), width=8, dilations=(1,), dim=8))
    enc.save_pretrained(places / LEARNED)
    feats = dd.build_default_dinov2("dinov2_vitl14", weights_key="dinov2.weights")
    assert isinstance(feats, LearnedPatchFeatures) and feats.grid == 37 and feats.patch_size == 14
    imgs = np.random.default_rng(0).integers(0, 255, (1, 518, 518, 3), dtype=np.uint8)
    assert feats.patch_tokens(feats.normalize(imgs))["prenorm"].shape == (1, 37 * 37, 8)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and LEARNED in err[0] and "dinov2.weights" in err[0]
