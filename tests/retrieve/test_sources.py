"""Bank sources: class folders and the procedural benchmark."""

from __future__ import annotations

import pytest

from incontext.errors import InputError
from incontext.retrieve.sources import source_items, synthetic_items


def test_folder_source(source_dir):
    items, total = source_items(source_dir)
    assert total == 12 and {it.cls for it in items} == {"red_stripes", "green_dots", "blue_checks"}
    items, total = source_items(source_dir / "green_dots")  # a folder of pairs is one class
    assert total == 4 and {it.cls for it in items} == {"green_dots"}


def test_synthetic_source_spreads_classes_and_is_deterministic():
    items, total = synthetic_items("test", per_class=1, size=64, max_classes=3)
    a = list(items)
    assert total == 3 and len({it.cls for it in a}) == 3
    assert all(it.dataset == "synthetic" and it.split == "test" and it.mask.max() == 1 for it in a)
    b = list(synthetic_items("test", per_class=1, size=64, max_classes=3)[0])
    assert all((x.image == y.image).all() for x, y in zip(a, b))
    items, total = source_items("synthetic:test", limit=2, per_class=1, size=64)
    assert total == 2 and len(list(items)) == 2


def test_unknown_source():
    with pytest.raises(InputError, match="neither an existing folder"):
        source_items("imagenet")
