"""``build("matcher_*")`` end to end on real photos with the tiny backbones of configs/backbone (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from incontext.episode import Context
from incontext.methods.matcher import Matcher, resize_image, resize_mask, sam_input
from incontext.registry import build, compose_method

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO.parent / "shared" / "examples" / "persam"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The suite runs on 2 shared cores: one intra-op thread avoids OpenMP spinning against other workers.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_overrides() -> dict:
    load = lambda name: OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "backbone" / f"{name}.yaml"))
    return {"dinov2": load("dinov2_tiny"), "sam": load("sam_tiny")}


@pytest.fixture(scope="module")
def photos():
    if not (EXAMPLES / "cat_00.jpg").is_file():
        pytest.skip(f"example photos not found under {EXAMPLES}")
    from incontext.io import read_image, read_mask

    return {
        "support": (read_image(EXAMPLES / "cat_00.jpg"), read_mask(EXAMPLES / "cat_00.png")),
        "q1": read_image(EXAMPLES / "cat_01.jpg"),
        "q2": read_image(EXAMPLES / "cat_02.jpg"),
    }


@pytest.fixture(scope="module")
def fss():
    return build("matcher_fss", **tiny_overrides())


def test_configs_compose_with_published_values():
    fss_node, coco_node, part_node = (compose_method(n) for n in ("matcher_fss", "matcher_coco", "matcher_part"))
    assert fss_node.dinov2.name == "dinov2_vitl14" and fss_node.sam.name == "sam_vit_h"
    assert (fss_node.alpha, fss_node.beta, fss_node.exp, fss_node.num_merging_mask) == (0.8, 0.2, 1.0, 10)
    assert list(coco_node.sample_range) == [1, 6] and coco_node.use_dense_mask and coco_node.box_nms_thresh == 0.65
    assert part_node.use_box and part_node.coverage_filter == 0.3 and part_node.max_sample_iterations == 128
    assert compose_method("matcher_lvis").purity_filter == coco_node.purity_filter == 0.02


def test_fss_on_real_photos(fss, photos):
    assert isinstance(fss, Matcher)
    ctx = fss.prepare([photos["support"]])
    assert ctx.tensors["c1.support_tokens"].shape == (1369, 64)
    assert ctx.tensors["c1.support_fg"].dtype == torch.bool and ctx.tensors["c1.support_fg"].any()
    q = photos["q1"]
    pred = fss.segment(q, ctx)
    assert pred.mask.shape == q.shape[:2] and pred.scores[1].shape == q.shape[:2]
    assert 1 <= len(pred.instances) <= 10
    assert all(inst.mask.shape == q.shape[:2] and np.isfinite(inst.score) for inst in pred.instances)
    assert pred.extras["n_candidates"] == 154  # 8 centres: C(8,4) + C(8,5) + C(8,6)
    assert pred.extras["points"].shape[1] == 2
    assert pred.extras["points"][:, 0].max() <= q.shape[1] and pred.extras["points"][:, 1].max() <= q.shape[0]
    # every selected instance lies inside the union
    union = np.any([i.mask for i in pred.instances], axis=0)
    assert (pred.mask | ~union).mean() > 0.99


def test_prepare_once_segment_many_is_order_independent(fss, photos, tmp_path):
    ctx = fss.prepare([photos["support"]])
    a1, b1 = list(fss.segment_many([photos["q1"], photos["q2"]], ctx))
    b2 = fss.segment(photos["q2"], ctx)  # without q1 before it: same seed, same result
    np.testing.assert_array_equal(b1.mask, b2.mask)
    ctx.save(tmp_path / "cat.safetensors")
    a2 = fss.segment(photos["q1"], Context.load(tmp_path / "cat.safetensors"))
    np.testing.assert_array_equal(a1.mask, a2.mask)
    assert [i.score for i in a1.instances] == [i.score for i in a2.instances]


def test_support_features_are_computed_once_per_prepare(fss, photos, monkeypatch):
    # Caching (issue 5): prepare() pays the supports' DINOv2 pass once; each query then pays one DINOv2 and one
    # SAM encoder pass, however many queries are segmented against the context.
    calls = {"dinov2_images": [], "sam": 0}
    patch_tokens, embed = fss.dinov2.patch_tokens, fss.predictor.embed

    def counting_patch_tokens(x, *a, **k):
        calls["dinov2_images"].append(int(x.shape[0]))
        return patch_tokens(x, *a, **k)

    def counting_embed(*a, **k):
        calls["sam"] += 1
        return embed(*a, **k)

    monkeypatch.setattr(fss.dinov2, "patch_tokens", counting_patch_tokens)
    monkeypatch.setattr(fss.predictor, "embed", counting_embed)
    ctx = fss.prepare([photos["support"]])
    assert calls == {"dinov2_images": [1], "sam": 0}
    preds = list(fss.segment_many([photos["q1"], photos["q2"], photos["q1"]], ctx))
    assert len(preds) == 3
    assert calls == {"dinov2_images": [1, 1, 1, 1], "sam": 3}
    np.testing.assert_array_equal(preds[0].mask, preds[2].mask)


def test_run_exposes_every_stage(fss, photos):
    img, mask = photos["support"]
    images = resize_image(img, 518)[None]
    masks = resize_mask(mask, 518)[None]
    with torch.inference_mode():
        enc = fss.encode_supports(images, masks)
        out = fss.run(resize_image(photos["q1"], 518), enc["tokens"], enc["fg"], shots=1, seed=3)
    assert out["clustering"].centres.shape == (8, 2)
    assert [g.shape for g in out["prompt_groups"]] == [(70, 4, 2), (56, 5, 2), (28, 6, 2)]
    assert out["scores"].score.shape == (154,) and out["final_518"].shape == (518, 518)
    assert set(out["timings"]) >= {"dinov2_query_s", "sam_encode_s", "sam_decode_s", "scoring_s"}


def test_sam_input_truncates_like_released_code():
    img = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    expected = (torch.from_numpy(img).float() / 255 * 255).byte().numpy()
    np.testing.assert_array_equal(sam_input(img), expected)


def test_coco_branch_with_small_grid(photos):
    # The COCO settings with a 4x4 grid (the released 64x64 grid costs minutes with the tiny SAM) and thresholds
    # the random tiny SAM can pass.
    m = build("matcher_coco", **tiny_overrides(), points_per_side=4, max_sample_iterations=4,
              pred_iou_thresh=0.0, stability_score_thresh=0.0, iou_filter=0.0, sel_stability_score_thresh=0.0)
    pred = m.segment(photos["q1"], [photos["support"]])
    assert pred.mask.shape == photos["q1"].shape[:2]
    assert pred.extras["selection_path"] == "score_filter" and 1 <= len(pred.instances) <= 9


def test_two_shots_use_the_multishot_merge_count(fss, photos):
    img, mask = photos["support"]
    flipped = (np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
    ctx = fss.prepare([photos["support"], flipped])
    assert ctx.tensors["c1.support_tokens"].shape == (2 * 1369, 64)
    pred = fss.segment(photos["q1"], ctx)
    assert len(pred.instances) <= 5


def test_bad_settings_are_named(fss):
    from incontext.errors import InputError

    with pytest.raises(InputError, match="sample_range"):
        Matcher(fss.dinov2, fss.predictor, sample_range=[5, 2])
    with pytest.raises(InputError, match="image_size"):
        Matcher(fss.dinov2, fss.predictor, image_size=500)
    with pytest.raises(InputError, match="output_layer"):
        Matcher(fss.dinov2, fss.predictor, output_layer=7)
