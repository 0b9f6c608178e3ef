"""The SAM training task: decoder equivalence, samples, prompts, a tiny train + exact resume, evaluation, folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from incontext.backbones.sam import SamArch, build_sam_model, load_sam
from incontext.refine.sam_refine import MASK_PROMPT_LOGIT, center_point, mask_box, mask_to_prompt_logits
from incontext.train.sam_task import (
    InteractiveSam,
    PromptEvalSet,
    SamTask,
    SceneSource,
    decode_aligned,
    degrade_mask,
    dice,
    evaluate_prompts,
    save_sam_folder,
    sigmoid_focal,
)

# 64 px input, patch 8 -> 8x8 token grid, 32x32 low-res masks: a few ms per decoder call. mask_in_chans 8, not
# 4: with 4 the mask encoder's first conv has 1 channel, whose LayerNorm2d output is 0 (so it never learns).
TINY = dict(image_size=64, vit_patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=[1], encoder_window_size=4, encoder_mlp_ratio=2.0, prompt_embed_dim=32,
            mask_in_chans=8, decoder_transformer_mlp_dim=64, decoder_transformer_num_heads=2,
            iou_head_hidden_dim=32)


def _tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    arch = SamArch(**{**TINY, "encoder_global_attn_indexes": (1,)})
    return build_sam_model(arch), arch


def test_decode_aligned_matches_predict_masks():
    sam, _ = _tiny_sam()
    with torch.no_grad():
        emb = sam.image_encoder(torch.randn(1, 3, 64, 64))
        pts = torch.tensor([[[10.0, 20.0], [30.0, 5.0]], [[50.0, 50.0], [1.0, 2.0]], [[0.0, 63.0], [20.0, 20.0]]])
        lab = torch.tensor([[1, 0], [1, 1], [0, 1]])
        sparse, dense = sam.prompt_encoder(points=(pts, lab), boxes=None, masks=torch.randn(3, 1, 32, 32))
        pe = sam.prompt_encoder.get_dense_pe()
        ref_m, ref_i = sam.mask_decoder.predict_masks(emb, pe, sparse, dense)
        got_m, got_i = decode_aligned(sam.mask_decoder, emb.expand(3, -1, -1, -1), pe, sparse, dense)
    assert got_m.shape == (3, 4, 32, 32) and got_i.shape == (3, 4)
    torch.testing.assert_close(got_m, ref_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_i, ref_i, atol=1e-5, rtol=1e-5)


def test_prompt_helpers():
    m = np.zeros((40, 60), bool)
    m[10:30, 5:25] = True
    x, y = center_point(m)
    assert 13 <= x <= 16 and 18 <= y <= 21  # centre of the 20x20 square (inclusive 5..24, 10..29)
    np.testing.assert_array_equal(mask_box(m), [5, 10, 24, 29])
    # 60 wide -> resized to 64x43 (ResizeLongestSide), padded to 64x64, area-resampled to 32x32.
    low = mask_to_prompt_logits(m, 64, 32)
    assert low.shape == (1, 32, 32)
    assert low[0, 10, 8] == pytest.approx(MASK_PROMPT_LOGIT)  # inside the square
    assert low[0, 30, 30] == pytest.approx(-MASK_PROMPT_LOGIT)  # padding below the image
    assert low[0, 2, 20] == pytest.approx(-MASK_PROMPT_LOGIT)


def test_degrade_mask_is_a_plausible_nonempty_copy():
    rng = np.random.default_rng(0)
    m = np.zeros((128, 128), bool)
    m[40:90, 30:80] = True
    ious = []
    for _ in range(20):
        d = degrade_mask(m, rng)
        assert d.shape == m.shape and d.dtype == bool and d.any()
        ious.append((d & m).sum() / (d | m).sum())
    assert 0.3 < np.mean(ious) < 1.0  # degraded, but still about the object


def test_losses_basic_values():
    t = torch.zeros(1, 8, 8)
    t[0, 2:6, 2:6] = 1
    good, bad = (t * 2 - 1) * 20, -(t * 2 - 1) * 20
    assert float(dice(good, t)) < 1e-3 and float(dice(bad, t)) > 0.95
    assert float(sigmoid_focal(good, t)) < 1e-6 < float(sigmoid_focal(bad, t))


def test_scene_source_and_sample():
    src = SceneSource(split="train", sizes=(64, 96), seed=3)
    a, b = src.episode(5), src.episode(5)
    np.testing.assert_array_equal(a.query, b.query)
    np.testing.assert_array_equal(a.query_mask, b.query_mask)
    assert a.query_mask.max() >= 2 and a.supports == []
    task = SamTask(TINY, max_instances=4, min_area=4)
    s1 = task.make_sample(a, np.random.default_rng(1))
    s2 = task.make_sample(a, np.random.default_rng(1))
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])
    assert s1["image"].shape == (3, 64, 64) and s1["masks"].shape == (4, 64, 64)
    assert s1["coarse"].shape == (4, 1, 32, 32)
    v = s1["valid"]
    assert v.any() and bool((s1["masks"][v].flatten(1).sum(1) >= 4).all())
    for j in np.flatnonzero(v.numpy()):  # first prompts lie on / around their object
        m = s1["masks"][j].bool()
        if s1["ptype"][j] == 0:
            x, y = s1["point"][j].long()
            assert m[y, x]
        elif s1["ptype"][j] == 1:
            ys, xs = np.nonzero(m.numpy())
            assert np.abs(s1["box"][j].numpy() - [xs.min(), ys.min(), xs.max(), ys.max()]).max() <= 64 * 20 / 1024 + 1e-4


def test_state_dict_keys_are_sams():
    task = SamTask(TINY)
    torch.manual_seed(0)
    model = task.build_model()
    plain, _ = _tiny_sam()
    assert set(model.state_dict()) == set(plain.state_dict())


def _tiny_cfg(**kw):
    from incontext.train.loop import TrainConfig

    base = dict(max_steps=4, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=1000, save_every=2,
                progress=False, tensorboard=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_training_runs_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from incontext.train.loop import train

    task = SamTask(TINY, max_instances=3, min_area=4, corrective_points=1, mask_only_rounds=1)
    data = SceneSource(split="train", sizes=(64,), seed=0)
    full = train(task, data, _tiny_cfg(), tmp_path / "full")
    assert np.isfinite(full["last_loss"]) and full["step"] == 4
    # An interrupted run (2 steps, then resumed to 4) ends with bit-identical weights.
    train(task, data, _tiny_cfg(max_steps=2), tmp_path / "cut")
    res = train(task, data, _tiny_cfg(), tmp_path / "cut", resume=True)
    assert res["step"] == 4
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    cfg = json.loads((tmp_path / "full" / "checkpoints" / "last" / "config.json").read_text())
    sam = load_sam("sam_tiny_synthetic", arch=cfg["arch"],
                   weights=tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    assert sam.image_encoder.img_size == 64


def test_evaluate_prompts_and_folder_roundtrip(tmp_path):
    from incontext.backbones.sam_shipped import load_sam_folder

    sam, arch = _tiny_sam()
    save_sam_folder(sam, arch, tmp_path / "m")
    pred = load_sam_folder(tmp_path / "m")
    for k, v in sam.state_dict().items():
        torch.testing.assert_close(pred.model.state_dict()[k], v)
    data = PromptEvalSet(split="test", size=96, scenes=2, seed=0)
    assert all(len(data[i].masks) > 0 for i in range(2))
    out = evaluate_prompts(pred, data, clicks=2)
    assert set(out) >= {"miou_1pt", "miou_1pt_oracle", "miou_2pt", "miou_box", "miou", "objects"}
    assert out["objects"] == sum(len(data[i].masks) for i in range(2))
    for k in ("miou_1pt", "miou_2pt", "miou_box"):
        assert 0.0 <= out[k] <= 100.0
    assert out["miou_1pt_oracle"] >= out["miou_1pt"]


def test_interactive_forward_gradients_reach_every_module():
    task = SamTask(TINY, max_instances=4, min_area=4, prompt_probs=(1, 1, 1))
    torch.manual_seed(0)
    model = task.build_model()
    src = SceneSource(split="train", sizes=(64,), seed=1)
    from incontext.train.data import stack

    batch = stack([task.make_sample(src.episode(i), np.random.default_rng(i)) for i in range(3)])
    torch.manual_seed(0)
    loss, logs = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(logs) == {f"iou_{k}_{w}" for k in ("point", "box", "coarse") for w in ("first", "last")}
    for name in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_prediction_head.layers.0.weight",
                 "prompt_encoder.mask_downscaling.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name
