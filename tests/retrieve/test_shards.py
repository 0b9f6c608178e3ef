"""Sharded search: the merged top-k of shards equals the top-k of one bank holding everything."""

from __future__ import annotations

import numpy as np
import pytest

from incontext.errors import InputError
from incontext.retrieve import PromptBank, folder_items
from incontext.retrieve.shards import merge_topk, search_shards

from .conftest import concept_pair


def test_shards_merge_to_the_single_bank_result(tmp_path, source_dir, fast_config):
    items = folder_items(source_dir)
    a = PromptBank.create(tmp_path / "a", fast_config)
    a.add(items[:6], cache=False, progress=False)  # fits the embedding statistics
    # Shards share one fitted embedding (same spec), and so does the reference bank holding everything.
    b = PromptBank.create(tmp_path / "b", fast_config, first_id=6)
    whole = PromptBank.create(tmp_path / "whole", fast_config)
    for bank in (b, whole):
        bank.embedder.load_state(a.embedder.state_dict())
    b.add(items[6:], cache=False, progress=False)
    whole.add(items, cache=False, progress=False)
    q = a.embedder.query(concept_pair("green_dots", 8)[0])
    s, i = search_shards([a, b], q.vector, 5, spec=q.spec)
    s1, i1 = whole.search(q.vector, 5, spec=q.spec)
    assert i.tolist() == i1.tolist() and np.allclose(s, s1, atol=1e-5)
    with pytest.raises(InputError, match="shares entry ids"):
        search_shards([a, a], q.vector, 5, spec=q.spec)


def test_merge_keeps_largest_scores():
    s, i = merge_topk([np.array([[0.9, 0.5]]), np.array([[0.8, 0.7]])], [np.array([[1, 2]]), np.array([[10, 11]])],
                      3)
    assert i.tolist() == [[1, 10, 11]] and np.allclose(s, [[0.9, 0.8, 0.7]])
