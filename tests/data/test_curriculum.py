"""Curriculum episode sources: index-pure items, rival episodes where only the prompt names the target, and the
mixing schedule."""

from __future__ import annotations

import numpy as np

from incontext.data.curriculum import Curriculum, RectEpisodes, RivalEpisodes


def test_rival_episodes_are_index_pure_and_prompt_necessary():
    src = RivalEpisodes(size=64, classes_start=8, ramp_items=100)
    a, b = src.episode(3), src.episode(3)
    assert np.array_equal(a.query, b.query) and np.array_equal(a.query_mask, b.query_mask)
    assert set(np.unique(a.query_mask)) <= {0, 1} and a.query_mask.any()
    assert len(a.supports) == 1 and a.supports[0].mask.any()
    assert src.pool_size(0) == 8 and src.pool_size(50) < src.pool_size(99) < src.pool_size(100) == 960
    assert len({src.ids[int(k)] for k in src.order[:8]}) == 8  # the first pool: 8 distinct train classes


def test_curriculum_schedule_and_sources():
    rect, rival = RectEpisodes(size=32), RivalEpisodes(size=64)
    cur = Curriculum(rect, rival, p_start=1.0, p_end=0.0, ramp_items=100)
    assert cur.p_first(0) == 1.0 and cur.p_first(50) == 0.5 and cur.p_first(10**6) == 0.0
    assert cur.episode(0).query.shape[0] == 32  # item 0: always the first source
    late = cur.episode(1000)
    assert late.query.shape[0] == 64
    assert np.array_equal(cur.episode(40).query, cur.episode(40).query)


def test_decoy_episodes_attach_another_episodes_supports():
    from incontext.data.curriculum import DecoyEpisodes
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.train.data import as_train_item

    bench = SyntheticBenchmark(split="train", size=64, episodes=1, seed=0)
    src = DecoyEpisodes(bench, offset=1000)
    item, again = src.episode(5), src.episode(5)
    plain = as_train_item(bench.episode(5))
    assert np.array_equal(item.query, plain.query) and np.array_equal(item.query_mask, plain.query_mask)
    assert len(item.decoys) == 1 and np.array_equal(item.decoys[0].image, again.decoys[0].image)
    assert bench.episode_classes(5) != bench.episode_classes(1005)
    assert not np.array_equal(item.decoys[0].image, item.supports[0].image)
