"""The procedural benchmark: class table and split, determinism, ground truth, distractors, controls."""

from __future__ import annotations

import numpy as np
import pytest

from incontext.data.shapes import SHAPES, rasterise
from incontext.data.synthetic import (
    TABLE_FILE,
    SceneRenderer,
    SyntheticBenchmark,
    SyntheticStream,
    class_table,
    is_test_appearance,
    table_tsv,
)
from incontext.errors import InputError


def test_class_table_is_the_committed_file():
    assert TABLE_FILE.read_text() == table_tsv()


def test_split_sizes_and_disjointness():
    table = class_table()
    train = [c for c in table if c.split == "train"]
    test = [c for c in table if c.split == "test"]
    assert len(table) >= 1000 and (len(train), len(test)) == (960, 240)
    assert {c.id for c in train}.isdisjoint({c.id for c in test})
    assert len({(c.shape, c.pattern, c.scheme) for c in table}) == len(table)  # every class is distinct
    # split by appearance: no (pattern, scheme) is in both splits, but every pattern and scheme is in both
    assert {c.appearance for c in train}.isdisjoint({c.appearance for c in test})
    assert all(is_test_appearance(*c.appearance) == (c.split == "test") for c in table)
    for attr in ("pattern", "scheme", "shape"):
        assert {getattr(c, attr) for c in train} == {getattr(c, attr) for c in test}
    per_shape = np.bincount([c.shape for c in test], minlength=len(SHAPES))
    assert (per_shape == 6).all()


def test_every_shape_rasterises_inside_the_canvas():
    for i in range(len(SHAPES)):
        m = rasterise(i, (64, 64), (32, 32), 20, 0.3)
        assert m.shape == (64, 64) and m.sum() > 60, SHAPES[i].name
        assert not m[0].any() and not m[-1].any()


def _same(a, b):
    assert np.array_equal(a.episode.query, b.episode.query)
    assert np.array_equal(a.target, b.target)
    assert len(a.episode.supports) == len(b.episode.supports)
    for s, t in zip(a.episode.supports, b.episode.supports):
        assert np.array_equal(s.image, t.image) and np.array_equal(s.mask, t.mask)


def test_episodes_are_deterministic_and_order_free():
    a = SyntheticBenchmark(size=64, shots=2, episodes=10, seed=3)
    b = SyntheticBenchmark(size=64, shots=2, episodes=10, seed=3)
    late = b[7]
    _ = [b[i] for i in range(3)]
    _same(a[7], late)  # same bits whatever was drawn before
    _same(a[2], b[2])
    other = SyntheticBenchmark(size=64, shots=2, episodes=10, seed=4)[7]
    assert not np.array_equal(other.episode.query, late.episode.query)


def test_one_shot_support_is_the_first_of_five():
    one = SyntheticBenchmark(size=64, shots=1, seed=0)[4]
    five = SyntheticBenchmark(size=64, shots=5, seed=0)[4]
    assert np.array_equal(one.episode.query, five.episode.query)
    assert np.array_equal(one.episode.supports[0].image, five.episode.supports[0].image)
    assert len(five.episode.supports) == 5


def test_first_episodes_cover_distinct_classes():
    b = SyntheticBenchmark(size=64, episodes=240)
    classes = [b.episode_classes(i)[0] for i in range(240)]
    assert sorted(classes) == b.class_ids


@pytest.mark.parametrize("split", ["train", "test"])
def test_ground_truth_masks_and_distractors(split):
    b = SyntheticBenchmark(split=split, size=80, shots=1, episodes=12, seed=1)
    table = class_table()
    for s in b:
        q = s.episode.query
        assert q.shape == (80, 80, 3) and q.dtype == np.uint8
        assert s.target.shape == q.shape[:2]
        assert set(np.unique(s.target)) == {0, 1}  # non-empty, binary, inside the image by construction
        assert table[s.classes[0]].split == split
        roles = [g.role for g in s.instances]
        assert "distractor" in roles and "target" in roles
        for g in s.instances:
            assert g.mask.shape == q.shape[:2] and g.mask.any()
            if g.role == "distractor":
                assert g.class_id != s.classes[0] and table[g.class_id].split == split
        union = np.any([g.mask for g in s.instances if g.role == "target"], axis=0)
        assert np.array_equal(union, s.target == 1)
        for sup in s.episode.supports:
            assert sup.mask.shape == sup.image.shape[:2] and (sup.mask == 1).any()


def test_hard_distractors_share_one_factor():
    r = SceneRenderer("test", 64)
    table = class_table()
    kinds = {"shape": 0, "appearance": 0}
    for i in range(40):
        target = table[r.pools.ids[i]]
        for cid, _n, kind in r.distractor_groups(np.random.default_rng([5, i]), [target.id], {target.id}):
            d = table[cid]
            assert cid != target.id
            if kind == "shape":
                assert d.shape == target.shape and d.appearance != target.appearance
            if kind == "appearance":
                assert d.appearance == target.appearance and d.shape != target.shape
            kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds["shape"] > 0 and kinds["appearance"] > 0


def test_multi_class_episodes_have_label_maps():
    s = SyntheticBenchmark(size=96, ways=2, shots=1, episodes=3)[1]
    assert len(s.classes) == 2 and len(set(s.classes)) == 2
    assert {1, 2} <= set(np.unique(s.target))
    assert sorted(c for sup in s.episode.supports for c in sup.classes) == [1, 2]


def test_shuffled_supports_keep_the_query_and_change_the_class():
    m = SyntheticBenchmark(size=64, episodes=4, supports="matched")
    sh = SyntheticBenchmark(size=64, episodes=4, supports="shuffled")
    for i in range(4):
        a, b = m[i], sh[i]
        assert np.array_equal(a.episode.query, b.episode.query) and np.array_equal(a.target, b.target)
        assert b.support_classes != b.classes and a.support_classes == a.classes


def test_stream_shards_by_rank_and_worker():
    from torch.utils.data import DataLoader

    it = iter(SyntheticStream(size=48, seed=2, rank=1, world=2))
    first, second = next(it), next(it)
    bench = SyntheticBenchmark(split="train", size=48, seed=2)
    assert (first.index, second.index) == (1, 3)
    _same(first, bench.episode(1))
    batch = next(iter(DataLoader(SyntheticStream(size=48, seed=2), batch_size=2, collate_fn=list)))
    assert [x.index for x in batch] == [0, 1]


def test_bad_settings_are_named():
    with pytest.raises(InputError, match="benchmark.split"):
        SyntheticBenchmark(split="val")
    with pytest.raises(InputError, match="supports"):
        SyntheticBenchmark(supports="random")
    with pytest.raises(InputError, match="shots"):
        SyntheticBenchmark(shots=0)
