"""VectorIndex: the FAISS wrapper's ids, filters, removal and serialisation for each index family."""

from __future__ import annotations

import numpy as np
import pytest

from incontext.errors import InputError
from incontext.retrieve.index import IndexConfig, VectorIndex, normalize_rows


def _data(n=800, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return normalize_rows(rng.normal(size=(n, d))), np.arange(1000, 1000 + n, dtype=np.int64)


@pytest.mark.parametrize("factory,kind,removable", [
    ("Flat", "flat", True), ("HNSW16", "hnsw", False), ("IVF16,Flat", "ivf", True), ("IVF16,PQ8x4", "ivf", True),
    ("PQ8x4", "other", True), ("IVF16,PQ8x4fs,RFlat", "ivf", False)])
def test_families(factory, kind, removable):
    x, ids = _data()
    idx = VectorIndex(32, factory, nprobe=16, ef_search=64)
    assert idx.kind == kind
    idx.train(x, max_size=10_000)
    idx.add(x, ids)
    s, i = idx.search(x[:5], 3)
    assert i.shape == (5, 3) and np.all(np.diff(s, axis=1) <= 1e-6)
    if "PQ" not in factory or "RFlat" in factory:
        assert list(i[:, 0]) == list(ids[:5])  # a stored vector is its own nearest neighbour
    allowed = ids[100:140]
    s, i = idx.search(x[:4], 5, allowed=allowed)
    assert np.isin(i, allowed).all()
    removed = idx.remove(ids[:10])  # False: the bank rebuilds from its stored vectors instead
    assert removed == removable
    if removed:
        assert not np.isin(idx.search(x[:10], 5)[1], ids[:10]).any()
    clone = VectorIndex.from_bytes(idx.to_bytes(), 32, factory, 16, 64)
    assert np.array_equal(clone.search(x[20:25], 4)[1], idx.search(x[20:25], 4)[1])


def test_empty_like_keeps_training():
    x, ids = _data()
    idx = VectorIndex(32, "IVF16,Flat")
    idx.train(x, 10_000)
    idx.add(x, ids)
    fresh = idx.empty_like()
    assert fresh.is_trained and fresh.ntotal == 0


def test_bad_factory_and_auto():
    with pytest.raises(InputError, match="factory"):
        VectorIndex(30, "IVF16,PQ7")
    cfg = IndexConfig(factory="auto", auto_flat_max=1000)
    assert cfg.resolve(500) == "Flat" and cfg.resolve(1_000_000) == "IVF4096,Flat"
