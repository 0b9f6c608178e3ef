"""Shared fixtures: small synthetic images and masks built in memory (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def disc_image(h: int = 96, w: int = 128, cx: float = 0.5, cy: float = 0.5, r: float = 0.2,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A striped red disc on a noisy grey background: (H, W, 3) uint8 and its (H, W) 0/1 mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx - cx * w) ** 2 + (yy - cy * h) ** 2) < (r * min(h, w)) ** 2
    img = np.clip(rng.normal(110, 20, (h, w, 3)), 0, 255)
    stripes = ((xx + yy) // 4) % 2
    img[mask] = np.stack([200 + 40 * stripes[mask], 30 * stripes[mask], 20 + 0 * stripes[mask]], -1)
    return img.astype(np.uint8), mask.astype(np.uint8)


@pytest.fixture
def disc_episode():
    """(query, query_mask, [(support, support_mask)]) with the disc at different places."""
    q, qm = disc_image(cx=0.3, cy=0.4, seed=1)
    s, sm = disc_image(cx=0.6, cy=0.6, seed=2)
    return q, qm, [(s, sm)]
