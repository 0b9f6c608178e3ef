"""refine=sam: parts of a coarse mask -> batched SAM prompts; acceptance rule; cache; pipeline use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.backbones.sam import BatchedSamPredictor, SamArch, build_sam_model
from incontext.errors import InputError
from incontext.pipeline import Carry, Pipeline
from incontext.refine.sam_refine import SamRefine, center_point, mask_box, mask_to_prompt_logits

ARCH = SamArch(image_size=64, vit_patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
               encoder_global_attn_indexes=(1,), encoder_window_size=4, encoder_mlp_ratio=2.0, prompt_embed_dim=32,
               mask_in_chans=8, decoder_transformer_mlp_dim=64, decoder_transformer_num_heads=2,
               iou_head_hidden_dim=32)


class SpySam(BatchedSamPredictor):
    """Counts encoder passes and records decode arguments."""

    def __init__(self, model):
        super().__init__(model, name="spy")
        self.embeds, self.calls = 0, []

    def embed(self, image, image_format="RGB"):
        self.embeds += 1
        return super().embed(image, image_format)

    def decode(self, points=None, labels=None, **kw):
        self.calls.append({"points": points, "labels": labels, **kw})
        return super().decode(points, labels, **kw)


@pytest.fixture()
def sam():
    torch.manual_seed(0)
    return SpySam(build_sam_model(ARCH))


def _scene():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    coarse = np.zeros((48, 80), bool)
    coarse[5:20, 5:30] = True  # big part
    coarse[25:45, 50:75] = True  # big part (larger)
    coarse[40, 2] = True  # a speck
    return q, coarse


def _carry(q, coarse, **kw):
    prob = torch.from_numpy(np.where(coarse, 0.8, 0.1).astype(np.float32))
    return Carry(query=q, cache={}, prob=prob, **kw)


def test_parts_largest_first_and_small_kept(sam):
    q, coarse = _scene()
    stage = SamRefine(sam, min_area=0.01)
    big, small = stage.parts(coarse)
    assert [int(p.sum()) for p in big] == [500, 375] and [int(p.sum()) for p in small] == [1]


def test_accepting_everything_gives_sams_masks(sam):
    q, coarse = _scene()
    stage = SamRefine(sam, min_area=0.01, min_agreement=0.0, min_pred_iou=-1e9)
    carry = _carry(q, coarse)
    stage(carry, {})
    call = sam.calls[-1]
    big, _ = stage.parts(coarse)
    # one prompt set per part: centre point, box, mask prompt in SAM's low-res frame; one batched call
    np.testing.assert_array_equal(call["points"][:, 0], [center_point(p) for p in big])
    np.testing.assert_array_equal(call["boxes"], np.stack([mask_box(p) for p in big]))
    np.testing.assert_array_equal(call["mask_input"], np.stack([mask_to_prompt_logits(p, 64, 32) for p in big]))
    assert call["multimask_output"] is False and len(sam.calls) == 1
    ref = sam.decode(call["points"], call["labels"], boxes=call["boxes"], mask_input=call["mask_input"],
                     multimask_output=False).masks[:, 0].numpy()
    expect = ref.any(0) | (coarse & ~big[0] & ~big[1])  # the speck is kept as it was
    np.testing.assert_array_equal(carry.mask.numpy(), expect)
    assert carry.extras["refine_sam"]["accepted"] == 2 and len(carry.instances) == 3
    p = carry.prob.numpy()
    assert p.shape == (48, 80) and p.min() >= 0 and p.max() <= 1
    m = carry.mask.numpy()
    assert (p[m] >= 0.5).all() and (p[~m] <= 0.5).all()  # probability agrees with the refined mask


def test_rejecting_everything_keeps_the_coarse_mask(sam):
    q, coarse = _scene()
    stage = SamRefine(sam, min_area=0.01, min_agreement=1.01)
    carry = _carry(q, coarse)
    stage(carry, {})
    np.testing.assert_array_equal(carry.mask.numpy(), coarse)
    assert carry.extras["refine_sam"]["accepted"] == 0
    stage2 = SamRefine(sam, min_area=0.01, min_agreement=1.01, drop_small=True)
    carry2 = _carry(q, coarse)
    stage2(carry2, {})
    assert int(carry2.mask.sum()) == 875


def test_negative_points_and_embedding_cache(sam):
    q, coarse = _scene()
    stage = SamRefine(sam, min_area=0.01)
    carry = _carry(q, coarse, points=torch.tensor([[10.0, 40.0], [60.0, 5.0]]),
                   point_labels=torch.tensor([0, 1]))
    stage(carry, {})
    call = sam.calls[-1]
    assert call["points"].shape == (2, 2, 2)
    np.testing.assert_array_equal(call["points"][:, 1], [[10.0, 40.0], [10.0, 40.0]])  # only the label-0 point
    np.testing.assert_array_equal(call["labels"], [[1, 0], [1, 0]])
    carry2 = _carry(q, coarse)
    carry2.cache = carry.cache  # a second class on the same query: no second encoder pass
    stage(carry2, {})
    assert sam.embeds == 1


def test_errors(sam):
    with pytest.raises(InputError, match="enable at least one"):
        SamRefine(sam, box=False, point=False, mask_prompt=False)
    q, _ = _scene()
    with pytest.raises(InputError, match="earlier match or generate stage"):
        SamRefine(sam)(Carry(query=q, cache={}), {})
    empty = Carry(query=q, cache={}, prob=torch.zeros(48, 80))
    SamRefine(sam)(empty, {})  # nothing to refine: an empty mask stays empty, SAM is not run
    assert not empty.mask.any() and sam.embeds == 0


class _BoxPrior:
    """A stand-in generate stage: probability 0.9 in a fixed rectangle."""

    def prepare(self, supports):
        return {}

    def __call__(self, carry, state):
        p = torch.full(carry.query.shape[:2], 0.1)
        p[10:30, 20:50] = 0.9
        carry.prob = p


def test_pipeline_with_refine(sam):
    q, _ = _scene()
    seg = Pipeline(name="boxprior", generate=_BoxPrior(), refine=SamRefine(sam, min_agreement=0.0))
    sup = (q, np.pad(np.ones((10, 10), np.uint8), ((5, 33), (5, 65))))
    pred = seg.segment(q, [sup])
    assert pred.mask.shape == (48, 80) and pred.extras["refine_sam"]["parts"] == 1
    assert len(pred.instances) == 1
