"""PerSAM's decoder hooks (incontext/refine/persam_decoder.py) on a small random SAM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from incontext.backbones.sam import SamEmbedding
from incontext.errors import InputError
from incontext.refine.persam_decoder import box_from_mask, decode, persam_guidance
from tests.refine.persam_helpers import one_thread, small_sam  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def predictor():
    pred = small_sam()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 32, 16, 16, generator=g)
    pred.set_embedding(SamEmbedding(feats, (200, 300), (171, 256)))
    return pred


def _prompts(pred):
    sparse, dense = pred.prompt_embeddings(
        torch.tensor([[[100.0, 80.0], [30.0, 150.0]]]),
        torch.tensor([[1, 0]], dtype=torch.int),
        None,
        None,
    )
    return dict(
        image_embeddings=pred.features,
        image_pe=pred.model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )


def _decoder_state(decoder):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in decoder.modules())
    overrides = sum("forward" in m.__dict__ for m in decoder.modules())
    return hooks, overrides


@torch.inference_mode()
def test_no_hooks_is_upstream_and_hooks_are_removed(predictor):
    dec = predictor.model.mask_decoder
    kw = _prompts(predictor)
    before = _decoder_state(dec)
    low0, iou0 = dec(**kw)
    with persam_guidance(dec) as d:
        low1, iou1 = d(**kw)
    assert torch.equal(low0, low1) and torch.equal(iou0, iou1)
    t = torch.randn(1, 1, 32)
    bias = torch.rand(1, 1, 1, 256)
    with persam_guidance(dec, attn_sim=bias, target_embedding=t):
        assert _decoder_state(dec) != before
        low2, _ = dec(**_prompts(predictor))
    assert not torch.allclose(low0, low2)
    assert _decoder_state(dec) == before  # everything removed on exit
    low3, iou3 = dec(**_prompts(predictor))
    assert torch.equal(low0, low3) and torch.equal(iou0, iou3)


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["official", "hf"])
def test_guided_attention_formula(predictor, mode):
    """Only the token->image attention changes: official re-softmaxes probabilities + bias, hf adds
    to the logits."""
    layer = predictor.model.mask_decoder.transformer.layers[0]
    attn = layer.cross_attn_token_to_image
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 5, 32, generator=g), torch.randn(1, 256, 32, generator=g)
    bias = torch.rand(1, 1, 1, 256, generator=g)
    qh = attn._separate_heads(attn.q_proj(q), attn.num_heads)
    kh = attn._separate_heads(attn.k_proj(k), attn.num_heads)
    vh = attn._separate_heads(attn.v_proj(k), attn.num_heads)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    w = (
        torch.softmax(torch.softmax(logits, -1) + bias, -1)
        if mode == "official"
        else torch.softmax(logits + bias, -1)
    )
    expected = attn.out_proj(attn._recombine_heads(w @ vh))
    with persam_guidance(predictor.model.mask_decoder, attn_sim=bias, mode=mode):
        got = attn(q=q, k=k, v=k)
        untouched = layer.self_attn(q=q, k=q, v=q)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, attn(q=q, k=k, v=k))  # restored afterwards
    torch.testing.assert_close(
        untouched, layer.self_attn(q=q, k=q, v=q)
    )  # other attentions untouched


@torch.inference_mode()
def test_semantic_prompt_enters_final_query_twice_in_official_mode(predictor):
    """Final token->image attention query: official = out2 + (tokens + t) + t, hf one t less."""
    dec = predictor.model.mask_decoder
    seen = {}

    def grab(_m, args, kwargs):
        seen["q"] = kwargs["q"].clone()

    t = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    qs = {}
    for mode in ("official", "hf"):
        with persam_guidance(dec, target_embedding=t, mode=mode):
            # registered after the guidance hooks, so it sees the query they produce
            handle = dec.transformer.final_attn_token_to_image.register_forward_pre_hook(
                grab, with_kwargs=True
            )
            try:
                dec(**_prompts(predictor))
            finally:
                handle.remove()
        qs[mode] = seen["q"]
    # both modes add t before each block (so block outputs agree); official adds t once more at the
    # end
    torch.testing.assert_close(qs["official"] - qs["hf"], t.expand_as(qs["hf"]))


@torch.inference_mode()
def test_decode_matches_segment_anything_predict(predictor):
    """Without hooks, ``decode`` is SamPredictor.predict's computation (points, box, mask input)."""
    pts, labels, box = (
        np.array([[100, 80], [30, 150]]),
        np.array([1, 0]),
        np.array([20, 10, 250, 180]),
    )
    out = decode(predictor, points_xy=pts, point_labels=labels, box_xyxy=box, multimask=True)
    masks, iou, low = predictor.predict(
        point_coords=pts, point_labels=labels, box=box, multimask_output=True, return_logits=True
    )
    np.testing.assert_array_equal(out.low_res.numpy(), low)
    np.testing.assert_array_equal(out.iou.numpy(), iou)
    np.testing.assert_array_equal(out.high_res().numpy(), masks)  # return_logits: un-thresholded
    # one channel upsampled alone: the same up to float rounding of the vectorised interpolation
    np.testing.assert_allclose(out.high_res(1).numpy(), masks[1], atol=1e-6)
    again = decode(
        predictor, points_xy=pts, point_labels=labels, mask_input=out.low_res[1:2], multimask=False
    )
    _, iou2, low2 = predictor.predict(
        point_coords=pts, point_labels=labels, mask_input=low[1:2], multimask_output=False
    )
    np.testing.assert_array_equal(again.low_res.numpy(), low2)
    np.testing.assert_array_equal(again.iou.numpy(), iou2)


def test_box_from_mask_and_bad_mode(predictor):
    m = np.zeros((10, 12), bool)
    assert box_from_mask(m) is None
    m[2:5, 3] = True
    m[7, 9] = True
    np.testing.assert_array_equal(
        box_from_mask(m), [3, 2, 9, 7]
    )  # inclusive extents, (x0, y0, x1, y1)
    with pytest.raises(InputError, match="guidance mode"):
        with persam_guidance(predictor.model.mask_decoder, mode="fork"):
            pass
