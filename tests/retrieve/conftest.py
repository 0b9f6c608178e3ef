"""Fixtures for the prompt-bank tests: a tiny class-folder source written to tmp, and small configs."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

# One FAISS thread: the CI machine is shared, and OpenMP workers spinning against other processes make tiny
# trainings take seconds instead of milliseconds.
faiss.omp_set_num_threads(1)

# Three concepts that the offline colour + texture features separate: colour and stripe pattern differ.
CONCEPTS = {
    "red_stripes": ((210, 40, 30), 4),
    "green_dots": ((40, 190, 60), 0),
    "blue_checks": ((40, 60, 210), 6),
}


def concept_pair(name: str, seed: int, h: int = 64, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image with one object of concept ``name`` on a noisy grey background, and its 0/1 mask."""
    colour, period = CONCEPTS[name]
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(120, 18, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    oh, ow = int(rng.integers(18, 26)), int(rng.integers(22, 30))
    y0, x0 = int(rng.integers(2, h - oh - 2)), int(rng.integers(2, w - ow - 2))
    mask = (yy >= y0) & (yy < y0 + oh) & (xx >= x0) & (xx < x0 + ow)
    tone = np.array(colour, float) + rng.normal(0, 8, 3)
    if period:
        on = ((xx // period + yy // period) % 2 == 0) if name == "blue_checks" else (((xx + yy) // period) % 2 == 0)
    else:
        on = ((xx % 5 < 2) & (yy % 5 < 2))
    obj = np.where(on[..., None], tone, tone * 0.45)
    img[mask] = obj[mask]
    return img.astype(np.uint8), mask.astype(np.uint8)


def write_source(root: Path, per_class: int = 4) -> Path:
    """``<root>/<class>/<name>.jpg + <name>.png`` for every concept."""
    for ci, name in enumerate(CONCEPTS):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            img, mask = concept_pair(name, seed=100 * ci + j)
            Image.fromarray(img).save(d / f"{name}_{j}.jpg", quality=95)
            Image.fromarray(mask * 255).save(d / f"{name}_{j}.png")
    return root


# Smaller working size than the default (224) keeps the tests fast; the recipe is the same.
FAST = ["embedding.features.size=96", "embedding.features.stride=4"]


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("pairs") / "src")


@pytest.fixture(scope="session")
def fast_config() -> dict:
    from incontext.retrieve import load_config

    return load_config("default", FAST)


@pytest.fixture(scope="session")
def saved_bank(tmp_path_factory, source_dir, fast_config) -> Path:
    """A bank built from ``source_dir`` and saved (session-wide; tests must not modify it)."""
    from incontext.retrieve import PromptBank, folder_items

    root = tmp_path_factory.mktemp("banks") / "bank"
    bank = PromptBank.create(root, fast_config)
    bank.add(folder_items(source_dir), cache=False, progress=False)
    bank.save()
    return root
