"""method=persam / persam_f (incontext/methods/persam.py): concepts, saving, sharing encodings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from incontext.episode import Context, Support
from incontext.errors import InputError
from incontext.methods.persam import CACHE_KEY, PerSAM, PerSAMF
from incontext.refine.persam_f import fit_mask_weights
from tests.conftest import REPO, disc_image
from tests.refine.persam_helpers import SMALL_SAM_ARCH, one_thread, small_sam  # noqa: F401

ITER = 30  # PerSAM-F iterations in these tests (official: 1000)


def _make(kind: str, seed: int = 0):
    return (
        PerSAM(small_sam(seed)) if kind == "persam" else PerSAMF(small_sam(seed), iterations=ITER)
    )


@pytest.fixture(scope="module")
def images():
    q1, _ = disc_image(cx=0.3, cy=0.4, seed=1)
    q2, _ = disc_image(h=80, w=60, cx=0.5, cy=0.5, seed=3)
    s, sm = disc_image(cx=0.6, cy=0.6, r=0.3, seed=2)
    s2, sm2 = disc_image(cx=0.3, cy=0.3, r=0.25, seed=4)
    return {"q1": q1, "q2": q2, "support": (s, sm), "support2": (s2, sm2)}


def _count_encodes(method):
    calls = []
    handle = method.predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kind", ["persam", "persam_f"])
def test_prepare_and_segment(kind, images):
    m = _make(kind)
    ctx = m.prepare([images["support"]])
    keys = {"c1.target_raw", "c1.target_sim", "c1.local_features"}
    if kind == "persam_f":
        keys |= {"c1.mask_weights", "c1.w"}
        assert ctx.meta["state"]["1"]["fit"]["iterations"] == ITER
        torch.testing.assert_close(ctx.tensors["c1.mask_weights"].sum(), torch.tensor(1.0))
    assert set(ctx.tensors) == keys
    st = ctx.meta["state"]["1"]
    assert st["sim_vector"] == ("mean" if kind == "persam" else "max_mean")
    assert st["attention"] is (kind == "persam") and st["semantic"] is (kind == "persam")
    assert ctx.tensors["c1.local_features"].shape[1] == 32
    pred = m.segment(images["q1"], ctx)
    assert pred.mask.shape == images["q1"].shape[:2] and pred.mask.dtype == np.uint8
    assert set(np.unique(pred.mask)) <= {0, 1}
    prob = pred.scores[1]
    assert (
        prob.shape == pred.mask.shape
        and prob.dtype == np.float32
        and 0 <= prob.min() <= prob.max() <= 1
    )
    np.testing.assert_array_equal(pred.mask == 1, prob > 0.5)
    assert len(pred.extras["points_xy"]) == (2 if kind == "persam" else 1)
    assert len(pred.instances) == 1 and pred.instances[0].mask.shape == pred.mask.shape


def test_persam_f_weights_are_the_fit_on_its_training_logits(images):
    m = _make("persam_f")
    ctx = m.prepare([images["support"]])
    state = m._state(ctx, 1)
    with torch.inference_mode():
        emb = m.predictor.embed(images["support"][0])
        logits, point = m.training_logits(emb, state["target_sim"])
    fit = fit_mask_weights(logits, torch.as_tensor(images["support"][1] > 0), iterations=ITER)
    torch.testing.assert_close(state["mask_weights"], fit.weights)
    assert ctx.meta["state"]["1"]["fit"]["train_points_xy"] == [point.tolist()]


def test_saved_concepts_give_identical_masks_in_another_process(images, tmp_path):
    """persam and persam_f concepts saved here, loaded and run by a fresh Python process."""
    expected = {}
    for kind in ("persam", "persam_f"):
        m = _make(kind)
        path = m.prepare([images["support"]]).save(tmp_path / f"{kind}.safetensors")
        expected[kind] = [
            p.mask for p in m.segment_many([images["q1"], images["q2"]], Context.load(path))
        ]
    np.save(tmp_path / "q1.npy", images["q1"])
    np.save(tmp_path / "q2.npy", images["q2"])
    script = textwrap.dedent(f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        from incontext.episode import Context, Support
        from incontext.methods.persam import PerSAM, PerSAMF
        from tests.refine.persam_helpers import small_sam
        d = {str(tmp_path)!r}
        qs = [np.load(d + "/q1.npy"), np.load(d + "/q2.npy")]
        for kind, m in (("persam", PerSAM(small_sam(0))), ("persam_f", PerSAMF(small_sam(0)))):
            ctx = Context.load(d + f"/{{kind}}.safetensors")
            for i, p in enumerate(m.segment_many(qs, ctx)):
                np.save(d + f"/{{kind}}_{{i}}.npy", p.mask)
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=300)
    for kind, masks in expected.items():
        for i, mask in enumerate(masks):
            np.testing.assert_array_equal(np.load(tmp_path / f"{kind}_{i}.npy"), mask)


def test_concepts_share_one_query_encoding(images):
    m = _make("persam")
    a = m.prepare([images["support"]])
    b = m.prepare([images["support2"]])
    single = [m.segment(images["q1"], c) for c in (a, b)]
    calls, handle = _count_encodes(m)
    try:
        both = m.segment_concepts(images["q1"], [a, b])
        assert len(calls) == 1  # one encoder pass for two concepts
        preds = list(m.segment_many([images["q1"], images["q2"]], a))
        assert len(calls) == 3  # then one per query
    finally:
        handle.remove()
    np.testing.assert_array_equal(both.scores[1], single[0].scores[1])
    np.testing.assert_array_equal(both.scores[2], single[1].scores[1])
    assert set(np.unique(both.mask)) <= {0, 1, 2}
    np.testing.assert_array_equal(preds[0].mask, single[0].mask)


def test_cache_reuses_the_embedding_for_the_same_query(images):
    m = _make("persam")
    state = m._state(m.prepare([images["support"]]), 1)
    cache: dict = {}
    calls, handle = _count_encodes(m)
    try:
        with torch.inference_mode():
            r1 = m.segment_binary(images["q1"], state, cache=cache)
            r2 = m.segment_binary(images["q1"], state, cache=cache)
    finally:
        handle.remove()
    assert len(calls) == 1 and CACHE_KEY in cache
    np.testing.assert_array_equal(r1.prob, r2.prob)


def test_concept_from_another_sam_is_refused(images):
    ctx = _make("persam", seed=0).prepare([images["support"]])
    other = PerSAM(small_sam(0))
    other.predictor.name = "sam_tiny@another"
    with pytest.raises(InputError, match="only works with the SAM that made it"):
        other.segment(images["q1"], ctx)


def test_masks_smaller_than_a_grid_cell_use_the_most_covered_cell(images):
    from incontext.match.location_prior import area_mask_grid

    img, _ = images["support"]
    thin = np.zeros(img.shape[:2], np.uint8)
    thin[10:12, 10:40] = 1  # 2 px high: no 16x16 block at SAM's scale, so neither grid rule keeps a cell
    for m in (_make("persam"), PerSAM(small_sam(), mask_grid="area")):
        state = m.prepare_binary([Support(img, thin)])
        emb = m.predictor.embed(img)
        size = m.predictor.model.image_encoder.img_size
        values = area_mask_grid(thin > 0, tuple(emb.features.shape[-2:]), img_size=size).values
        expected = emb.features[0].permute(1, 2, 0)[values >= values.max()]
        torch.testing.assert_close(state["local_features"], expected)
        assert m.segment(images["q1"], [(img, thin)]).mask.shape == images["q1"].shape[:2]


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="mask_grid"):
        PerSAM(small_sam(), mask_grid="pooled")
    with pytest.raises(InputError, match="guidance"):
        PerSAM(small_sam(), guidance="fork")
    with pytest.raises(InputError, match="BatchedSamPredictor"):
        PerSAM(small_sam().model)
    with pytest.raises(InputError, match="iterations"):
        PerSAMF(small_sam(), iterations=0)


@pytest.mark.parametrize("name", ["persam", "persam_f"])
def test_registry_builds_the_method_with_another_backbone(name, images):
    from incontext.registry import build, compose_method

    node = compose_method(name)
    assert node.sam._target_ == "incontext.backbones.sam_shipped.build_default_sam"  # build_sam when the file exists
    assert node.sam.name == "sam_vit_h"
    m = build(
        name,
        **{
            "sam.name": "sam_tiny",
            "sam.arch": SMALL_SAM_ARCH,
            "sam.weights": "random",
            "iterations": ITER,
        }
        if name == "persam_f"
        else {"sam.name": "sam_tiny", "sam.arch": SMALL_SAM_ARCH, "sam.weights": "random"},
    )
    assert isinstance(m, PerSAMF if name == "persam_f" else PerSAM)
    pred = m.segment(images["q1"], [images["support"]])
    assert pred.mask.shape == images["q1"].shape[:2]
