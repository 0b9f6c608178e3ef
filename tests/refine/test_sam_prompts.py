"""Matcher's prompt sampler and batched SAM candidate generation (tiny random SAM, small image)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score
from torchvision.ops.boxes import batched_nms

from incontext.backbones.sam import build_sam
from incontext.refine import sam_prompts as sp

TINY_SAM = dict(
    encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
    encoder_mlp_ratio=2.0, prompt_embed_dim=32, mask_in_chans=4, decoder_transformer_mlp_dim=64,
    decoder_transformer_num_heads=2, iou_head_hidden_dim=32,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The suite runs on 2 shared cores: one intra-op thread avoids OpenMP spinning against other workers
    # (results do not depend on it).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- sampler
def test_recursive_combinations_order_and_counts():
    assert sp.recursive_combinations(4, 2) == [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]
    assert sp.recursive_combinations(3, 3) == [[0, 1, 2]]
    assert sp.recursive_combinations(2, 3) == []
    assert [len(sp.recursive_combinations(8, k)) for k in (4, 5, 6)] == [70, 56, 28]
    combos = sp.recursive_combinations(8, 5)
    assert len({tuple(c) for c in combos}) == 56 and all(c == sorted(c) for c in combos)


def test_sample_prompt_sets_enumerates_up_to_eight_points():
    pts = np.arange(10).reshape(5, 2)
    groups = sp.sample_prompt_sets(pts, (4, 6), 30, random.Random(0))
    assert [g.shape for g in groups] == [(5, 4, 2), (1, 5, 2)]  # sizes clipped to n = 5
    order = [[0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 3, 4], [0, 2, 3, 4], [1, 2, 3, 4]]
    np.testing.assert_array_equal(groups[0], pts[np.array(order)])
    np.testing.assert_array_equal(groups[1], pts[None])


def test_sample_prompt_sets_draws_like_random_sample():
    pts = np.stack([np.arange(12), np.arange(12) * 2], 1)
    groups = sp.sample_prompt_sets(pts, (1, 3), 7, random.Random(5))
    ref = random.Random(5)
    for k, g in zip((1, 2, 3), groups):
        idx = [ref.sample(range(12), k) for _ in range(7)]
        np.testing.assert_array_equal(g, pts[np.array(idx)])


def test_generator_streams_match_the_global_one():
    """Parity relies on a seeded Generator drawing what torch's seeded global generator draws."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(7)
    a = (torch.randint(50, (1,)), torch.multinomial(probs, 1), torch.multinomial(probs, 1))
    g = torch.Generator().manual_seed(7)
    b = (torch.randint(50, (1,), generator=g), torch.multinomial(probs, 1, generator=g),
         torch.multinomial(probs, 1, generator=g))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_kmeans_pp_converges_and_is_seeded():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(c, 3, (20, 2)) for c in ((20, 20), (100, 30), (60, 120))]).astype(np.int64)
    c1, a1 = sp.kmeans_pp(pts, 3, torch.Generator().manual_seed(1))
    c2, a2 = sp.kmeans_pp(pts, 3, torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    x = torch.from_numpy(pts).float()
    assert torch.equal(a1, torch.argmin(torch.cdist(x, c1), dim=1))
    for k in range(3):
        assert torch.allclose(c1[k], x[a1 == k].mean(0))
    cl = sp.cluster_centres(pts, 8, torch.Generator().manual_seed(1))
    assert cl.runs >= 1 and len(np.unique(cl.assignment)) == 8
    np.testing.assert_array_equal(cl.centres, np.trunc(cl.centres_float).astype(np.int64))
    assert sp.cluster_centres(pts[:5], 8, torch.Generator().manual_seed(0)).centres.shape == (5, 2)


def test_chunks_stay_inside_released_batches():
    spans = sp._chunks(70, 64, 8)
    assert spans[:8] == [(i, i + 8) for i in range(0, 64, 8)] and spans[8:] == [(64, 70)]
    assert sp._chunks(10, 64, 8) == [(0, 10)]  # a 2-set tail is merged, never decoded alone
    assert sp._chunks(66, 64, 8)[-1] == (64, 66)  # ... unless the released batch itself is that small
    assert sp._chunks(130, 64, 2)[:2] == [(0, 4), (4, 8)]  # chunks of at least 4 sets
    for n in (1, 5, 63, 64, 65, 200):
        spans = sp._chunks(n, 64, 8)
        assert [i for a, b in spans for i in range(a, b)] == list(range(n))
        assert all(a // 64 == (b - 1) // 64 for a, b in spans)


# ------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def tiny():
    pred = build_sam("sam_tiny", arch=TINY_SAM, weights="random", seed=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)
    emb = pred.embed(image)
    return pred, image, emb


def _reference(pred, image_hw, groups, box, st):
    """Straight port of the released generator's loop on SamPredictor.predict_torch (batches of 64)."""
    h, w = image_hw
    out_masks, out_iou, out_src = [], [], []
    thr = pred.model.mask_threshold
    for g, sets in enumerate(groups):
        for b0 in range(0, len(sets), 64):
            pts = pred.transform.apply_coords(sets[b0 : b0 + 64], (h, w))
            coords = torch.as_tensor(pts, dtype=torch.float)
            labels = torch.ones(coords.shape[:2], dtype=torch.int)
            box_t = None
            if box is not None:
                box_t = torch.as_tensor(pred.transform.apply_boxes(box, (h, w)), dtype=torch.float)
                box_t = box_t.reshape(1, 4).expand(coords.shape[0], -1)
            masks, iou, _ = pred.predict_torch(coords, labels, box_t, multimask_output=st.multimask_output,
                                               return_logits=True)
            ch0 = 0
            if st.multimask_output and st.output_layer in (3, 4, 5):
                ch0 = st.output_layer - 3
                masks, iou = masks[:, ch0:], iou[:, ch0:]
            elif st.multimask_output and st.output_layer in (0, 1, 2):
                ch0 = st.output_layer
                masks, iou = masks[:, ch0 : ch0 + 1], iou[:, ch0 : ch0 + 1]
            m = masks.shape[1]
            masks, iou = masks.flatten(0, 1), iou.flatten(0, 1)
            src = torch.tensor([[1, g, b0 + i // m, ch0 + i % m] for i in range(len(iou))])
            keep = torch.ones(len(iou), dtype=torch.bool)
            if st.iou_filter > 0:
                keep &= iou > st.iou_filter
            stab = calculate_stability_score(masks, thr, 1.0)
            if st.sel_stability_score_thresh > 0:
                keep &= stab >= st.sel_stability_score_thresh
            out_masks.append(masks[keep] > thr)
            out_iou.append(iou[keep])
            out_src.append(src[keep])
    masks, iou, src = torch.cat(out_masks), torch.cat(out_iou), torch.cat(out_src)
    boxes = batched_mask_to_box(masks)
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(iou)), st.box_nms_thresh)
    return masks[keep], iou[keep], src[keep].numpy()


@pytest.mark.parametrize(
    "st_kw",
    [
        dict(multimask_output=False, box_nms_thresh=1.0),
        dict(multimask_output=True, output_layer=3, iou_filter=0.2, sel_stability_score_thresh=0.5,
             box_nms_thresh=0.7),
        dict(multimask_output=True, output_layer=4, box_nms_thresh=0.9),
        dict(multimask_output=True, output_layer=1, box_nms_thresh=1.0),
    ],
    ids=["fss", "coco-like", "layer4", "layer1"],
)
def test_candidates_match_released_loop(tiny, st_kw):
    pred, image, emb = tiny
    h, w = image.shape[:2]
    rng = np.random.default_rng(1)
    groups = [rng.integers(0, [w, h], (n, k, 2)) for n, k in ((70, 2), (9, 3))]
    st = sp.DecodeSettings(decode_chunk=8, **st_kw)
    with torch.inference_mode():
        got = sp.generate_candidates(pred.model, emb.features, (h, w), groups, None, st)
        pred.set_embedding(emb)
        masks, iou, src = _reference(pred, (h, w), groups, None, st)
    np.testing.assert_array_equal(got.source, src)
    np.testing.assert_allclose(got.iou_pred, iou.numpy(), atol=1e-6, rtol=0)
    assert torch.equal(got.masks, masks)
    assert got.groups[0].iou_pred.shape == (70, 3 if st_kw.get("output_layer") == 3 and st.multimask_output
                                             else 2 if st_kw.get("output_layer") == 4 else 1)
    assert np.all(np.diff(got.iou_pred) <= 0)  # NMS order: decreasing predicted IoU


def test_box_prompt_and_dense_grid(tiny):
    pred, image, emb = tiny
    h, w = image.shape[:2]
    groups = [np.array([[[10, 10], [30, 20], [50, 40]]] * 5)]
    st = sp.DecodeSettings(use_dense=True, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                           multimask_output=True, output_layer=3, dense_multimask=0)
    with torch.inference_mode():
        got = sp.generate_candidates(pred.model, emb.features, (h, w), groups, np.array([5, 5, 60, 40]), st)
    assert got.dense.iou_pred.shape == (16, 1) and got.dense_points.shape == (16, 2)
    np.testing.assert_allclose(got.dense_points[0], [w / 8, h / 8])
    assert (got.pre_nms_source[:16, 0] == 0).all() and (got.pre_nms_source[16:, 0] == 1).all()
    assert got.masks.shape[1:] == (h, w)


def test_nothing_survives_gives_empty_candidates(tiny):
    pred, image, emb = tiny
    st = sp.DecodeSettings(iou_filter=50.0)
    with torch.inference_mode():
        got = sp.generate_candidates(pred.model, emb.features, image.shape[:2], [np.array([[[3, 4]]] * 4)],
                                     None, st)
    assert got.masks.shape == (0, 48, 72) and len(got.nms_keep) == 0
    assert got.groups[0].pass_filters.shape == (4, 1) and not got.groups[0].pass_filters.any()


def test_on_batch_observer_sees_every_set(tiny):
    pred, image, emb = tiny
    seen = []
    groups = [np.full((70, 1, 2), 20)]
    with torch.inference_mode():
        sp.generate_candidates(pred.model, emb.features, image.shape[:2], groups, None,
                               sp.DecodeSettings(decode_chunk=16),
                               on_batch=lambda **kw: seen.extend(kw["rows"]))
    assert seen == list(range(70))


def test_select_outputs_rejects_impossible_layer():
    with pytest.raises(ValueError, match="output layer"):
        sp._select_outputs(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1), 2, True)


@pytest.mark.parametrize("multimask", [False, True])
def test_shared_first_block_decoder_is_bit_identical(tiny, multimask):
    from incontext.refine.matcher_decoder import decode_masks, supports_sharing

    pred, image, emb = tiny
    sam = pred.model
    assert supports_sharing(sam.mask_decoder)
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(6, 3, 2, generator=g) * 1024
    boxes = torch.tensor([[100.0, 200.0, 700.0, 600.0]]).expand(6, -1)
    for box in (None, boxes):
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=(coords, torch.ones(6, 3, dtype=torch.int)), boxes=box,
                                               masks=None)
            ref = sam.mask_decoder(image_embeddings=emb.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=multimask)
            got = decode_masks(sam.mask_decoder, emb.features, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                               multimask)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
