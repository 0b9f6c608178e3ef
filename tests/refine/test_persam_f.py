"""PerSAM-F's cached-logit fit equals the official autograd loop (incontext/refine/persam_f.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.errors import InputError
from incontext.refine.persam_f import (
    dice_loss,
    fit_mask_weights,
    fit_mask_weights_reference,
    mix_logits,
    sigmoid_focal_loss,
)
from tests.refine.persam_helpers import one_thread  # noqa: F401  (autouse fixture)


def _problem(h=40, w=56, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    target = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 3) ** 2
    base = torch.where(target, 1.0, -1.0)
    logits = torch.stack(
        [base * s + torch.randn(h, w, generator=g) * scale for s in (0.2, 1.0, 2.0)]
    )
    return logits, target


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_fast_fit_matches_official_loop(scale):
    logits, target = _problem(scale=scale)
    fast = fit_mask_weights(logits, target, iterations=60, record=True)
    ref = fit_mask_weights_reference(lambda: logits, target, iterations=60, record=True)
    np.testing.assert_allclose(fast.weights.numpy(), ref.weights.numpy(), atol=1e-6)
    np.testing.assert_allclose(fast.history["w_used"], ref.history["w_used"], atol=1e-6)
    np.testing.assert_allclose(fast.history["loss"], ref.history["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.history["dice"], ref.history["dice"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.history["focal"], ref.history["focal"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fast.history["lr"], ref.history["lr"])
    # The weights moved (the test would be vacuous otherwise) and the mixing weights sum to 1.
    assert np.abs(fast.weights.numpy() - 1 / 3).max() > 1e-3
    assert abs(float(fast.weights.sum()) - 1.0) < 1e-6


def test_official_defaults_and_schedule():
    logits, target = _problem()
    fit = fit_mask_weights(logits, target, iterations=10, record=True)
    np.testing.assert_allclose(fit.history["w_used"][0], [1 / 3, 1 / 3], atol=1e-7)
    # cosine annealing over T iterations, stepped each iteration, from lr 1e-3
    t = np.arange(10)
    np.testing.assert_allclose(
        fit.history["lr"], 1e-3 * (1 + np.cos(np.pi * t / 10)) / 2, rtol=1e-6
    )


def test_loss_functions_match_hand_computation():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    s = torch.sigmoid(z)
    dice = 1 - (2 * (s * y).sum() + 1) / (s.sum() + y.sum() + 1)
    assert torch.allclose(dice_loss(z, y), dice)
    ce = -(y * torch.log(s) + (1 - y) * torch.log(1 - s))
    p_t = s * y + (1 - s) * (1 - y)
    focal = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean()
    assert torch.allclose(sigmoid_focal_loss(z, y), focal)


def test_mix_logits_is_the_weighted_sum():
    logits = torch.randn(3, 5, 7)
    w = torch.tensor([0.2, -0.5, 1.3])
    torch.testing.assert_close(
        mix_logits(logits, w), 0.2 * logits[0] - 0.5 * logits[1] + 1.3 * logits[2]
    )


def test_fit_works_inside_inference_mode():
    logits, target = _problem()
    expected = fit_mask_weights(logits, target, iterations=5).weights
    with torch.inference_mode():
        got = fit_mask_weights(logits.clone(), target.clone(), iterations=5).weights
    torch.testing.assert_close(got, expected)


def test_bad_shapes_are_refused():
    with pytest.raises(InputError, match="expected \\(3, H, W\\)"):
        fit_mask_weights(torch.zeros(2, 4, 4), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="differs"):
        fit_mask_weights(torch.zeros(3, 4, 4), torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="iterations"):
        fit_mask_weights(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.bool), iterations=0)
