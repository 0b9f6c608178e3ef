"""The alternative-generator folder set (incontext/data/alt_set.py) writes what the folder loader reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from incontext.data.alt_set import FAMILIES, TEXTURES, make_classes, render_image, write_set
from incontext.data.folder import FolderBenchmark
from incontext.errors import InputError


def test_written_set_loads_as_folder_benchmark(tmp_path):
    root = write_set(tmp_path / "alt", classes=4, images=3, seed=1, size=(48, 64))
    b = FolderBenchmark(root=str(root), shots=2)
    assert len(b) == 12 and b.skipped == []
    for i in range(len(b)):
        s = b[i]
        h, w = s.episode.query.shape[:2]
        assert 48 <= h <= 64 and 48 <= w <= 64
        assert s.query_mask.shape == (h, w) and s.query_mask.any()
        assert len(s.episode.supports) == 2 and all(sup.mask.any() for sup in s.episode.supports)
    # same seed -> identical masks; another seed -> another set
    again = write_set(tmp_path / "again", classes=4, images=3, seed=1, size=(48, 64))
    other = write_set(tmp_path / "other", classes=4, images=3, seed=2, size=(48, 64))
    name = sorted(p.name for p in root.iterdir())[0]
    m1 = np.asarray(Image.open(root / name / "00.png"))
    assert np.array_equal(m1, np.asarray(Image.open(again / name / "00.png")))
    other_names = sorted(p.name for p in other.iterdir())
    assert other_names != sorted(p.name for p in root.iterdir()) or not np.array_equal(
        m1, np.asarray(Image.open(other / other_names[0] / "00.png")))


def test_classes_cover_every_family_and_texture_and_distractors_appear():
    classes = make_classes(35, seed=0)
    assert {c.family for c in classes} == set(FAMILIES)
    assert {c.texture for c in classes} == set(TEXTURES)
    assert len({c.name for c in classes}) == 35
    img, mask = render_image(classes, 3, seed=5, size=(96, 96))
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1} and mask.mean() >= 0.01


def test_bad_arguments_and_stale_folders(tmp_path):
    with pytest.raises(InputError, match="images"):
        write_set(tmp_path, classes=3, images=1)
    with pytest.raises(InputError, match="classes"):
        make_classes(1)
    (tmp_path / "someone_elses_class").mkdir()
    with pytest.raises(InputError, match="root"):
        write_set(tmp_path, classes=2, images=2, size=(32, 32))
