"""The offline SAM default: official file found -> build_sam; missing -> the shipped folder, said in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import incontext.backbones.sam_shipped as shipped
from incontext.backbones.sam import SamArch, build_sam_model
from incontext.errors import WeightsNotFoundError
from incontext.train.sam_task import save_sam_folder

ARCH = SamArch(image_size=64, vit_patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
               encoder_global_attn_indexes=(1,), encoder_window_size=4, encoder_mlp_ratio=2.0, prompt_embed_dim=32,
               mask_in_chans=8, decoder_transformer_mlp_dim=64, decoder_transformer_num_heads=2,
               iou_head_hidden_dim=32)


@pytest.fixture()
def places(tmp_path, monkeypatch):
    """Search places = one empty folder; the official file is never found."""
    monkeypatch.setattr(shipped, "search_dirs", lambda: [tmp_path / "w"])
    monkeypatch.setattr(shipped, "find", lambda name, path=None: (None, [str(tmp_path / "w" / "x.pth")]))
    monkeypatch.setattr(shipped, "_announced", set())
    return tmp_path / "w"


def test_fallback_to_shipped_with_one_line(places, capsys):
    torch.manual_seed(0)
    sam = build_sam_model(ARCH)
    save_sam_folder(sam, ARCH, places / shipped.SHIPPED_NAME)
    pred = shipped.build_default_sam("sam_vit_h")
    assert pred.model.image_encoder.img_size == 64 and pred.name.startswith(shipped.SHIPPED_NAME)
    for k, v in sam.state_dict().items():
        torch.testing.assert_close(pred.model.state_dict()[k], v)
    shipped.build_default_sam("sam_vit_h")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sam_tiny_synthetic" in err[0] and "backbone.weights" in err[0]


def test_no_fallback_when_configured_or_disabled(places):
    with pytest.raises(WeightsNotFoundError):  # shipped folder absent: one clear error
        shipped.build_default_sam("sam_vit_h")
    with pytest.raises(WeightsNotFoundError):  # fallback off: build_sam's own error for the official file
        shipped.build_default_sam("sam_vit_h", fallback=None)
    with pytest.raises(WeightsNotFoundError):  # an explicit path is never replaced
        shipped.build_default_sam("sam_vit_h", weights=places / "nope.pth")
    pred = shipped.build_default_sam("sam_tiny", arch=ARCH.__dict__ | {"encoder_global_attn_indexes": (1,)},
                                     weights="random")
    assert pred.name.startswith("sam_tiny@seed0")  # build_sam itself, seeded random init


def test_encoder_features_for_matcher():
    from incontext.backbones.sam import BatchedSamPredictor
    from incontext.errors import InputError

    torch.manual_seed(0)
    sam = build_sam_model(ARCH)  # 64 px input, 8x8 tokens
    feats = shipped.SamEncoderFeatures(BatchedSamPredictor(sam), work_size=256)
    assert feats.patch_size == 32 and feats.embed_dim == 32
    imgs = np.random.default_rng(0).integers(0, 255, (3, 256, 256, 3), dtype=np.uint8)
    x = feats.normalize(imgs)
    assert x.shape == (3, 3, 64, 64)
    tok = feats.patch_tokens(x, batch_size=2)["prenorm"]
    with torch.no_grad():
        ref = sam.image_encoder(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tok, ref)  # row-major grid of the neck output
    with pytest.raises(InputError, match="multiple"):
        shipped.SamEncoderFeatures(BatchedSamPredictor(sam), work_size=250)
