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
