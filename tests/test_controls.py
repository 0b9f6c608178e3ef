"""Support-free controls: they find an obvious salient object and never look at the supports."""

from __future__ import annotations

import numpy as np

import incontext
from incontext.metrics import iou
from tests.conftest import disc_image


def test_salient_object_finds_a_lone_disc_and_ignores_supports():
    q, qm = disc_image(cx=0.45, cy=0.5, r=0.25, seed=3)
    s1, m1 = disc_image(cx=0.3, cy=0.3, seed=4)
    s2 = np.zeros_like(s1)
    m2 = np.zeros_like(m1)
    m2[:5, :5] = 1
    model = incontext.build("salient")
    a = model.segment(q, [(s1, m1)])
    b = model.segment(q, [(s2, m2)])
    assert np.array_equal(a.mask, b.mask)
    assert iou(a.mask > 0, qm > 0) > 0.5


def test_centre_prior_is_a_centred_disc_of_the_configured_area():
    q, _ = disc_image(h=100, w=120)
    pred = incontext.build("centre_prior").segment(q, [(q, np.ones(q.shape[:2], np.uint8))])
    m = pred.mask > 0
    assert abs(m.mean() - 0.1) < 0.02 and m[50, 60] and not m[0, 0]
