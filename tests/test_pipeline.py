import numpy as np
import pytest

import incontext
from incontext import InputError
from incontext.metrics import iou
from tests.conftest import disc_image


def test_available_lists_every_config_and_builds_each():
    names = incontext.available()
    assert "prototype" in names


def test_unknown_method_suggests_near_names():
    with pytest.raises(InputError, match="prototype"):
        incontext.build("prototyp")


def test_prototype_segments_disc(disc_episode):
    q, qm, sup = disc_episode
    model = incontext.build("prototype")
    pred = model.segment(q, sup)
    assert pred.mask.shape == q.shape[:2] and pred.mask.dtype == np.uint8
    assert iou(pred.mask > 0, qm > 0) > 0.7
    assert set(pred.scores) == {1} and pred.scores[1].shape == q.shape[:2]


def test_prepare_once_segment_many_and_saved_context(tmp_path, disc_episode):
    q, _, sup = disc_episode
    model = incontext.build("prototype")
    ctx = model.prepare(sup)
    direct = model.segment(q, ctx)
    ctx.save(tmp_path / "concept.safetensors")
    loaded = incontext.Context.load(tmp_path / "concept.safetensors")
    again = list(model.segment_many([q, q], loaded))
    assert all(np.array_equal(p.mask, direct.mask) for p in again)


def test_multiclass_merges_highest_probability():
    img, disc = disc_image(cx=0.3, cy=0.5, r=0.15, seed=5)
    labels = disc.copy()
    # a second class: a blue square
    img[20:50, 80:110] = (20, 40, 220)
    labels[20:50, 80:110] = 2
    q = img.copy()
    model = incontext.build("prototype")
    pred = model.segment(q, [(img, labels)])
    assert set(pred.scores) == {1, 2}
    assert iou(pred.mask == 2, labels == 2) > 0.7
    assert iou(pred.mask == 1, labels == 1) > 0.5


def test_context_of_another_method_is_refused(disc_episode):
    q, _, sup = disc_episode
    model = incontext.build("prototype")
    ctx = model.prepare(sup)
    ctx.method = "other"
    with pytest.raises(InputError, match="other"):
        model.segment(q, ctx)


def test_build_overrides_reach_stage_settings():
    model = incontext.build("prototype", **{"match.bg_prototypes": 2})
    assert model.stages["match"].bg_prototypes == 2
