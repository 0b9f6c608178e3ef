"""Searching a bank split into shards: fan the query out, merge the per-shard top-k by score.

A bank too large for one machine (or one index) is stored as several ``PromptBank`` folders built with the same
retrieval config, disjoint id ranges (``PromptBank.create(..., first_id=...)`` / ``build --first-id``) and, for
IVF/PQ factories, the same trained index (train once on a sample, add each part to a copy of the empty trained
index). Each shard answers with its own top-k; :func:`merge_topk` keeps the k best over all shards —
``faiss.merge_knn_results(..., keep_max=True)``, since a larger inner product is better (FAISS's default keeps the
smallest values, which is right only for L2 distances). In one process, ``faiss.IndexShards(d, True, False)``
does the same over in-memory indexes; across machines each shard runs behind its own server and the client
merges with this function.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np

from incontext.errors import InputError
from incontext.retrieve.bank import PromptBank
from incontext.retrieve.embed import EmbeddingSpec

__all__ = ["merge_topk", "search_shards"]


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (each (Q, k_s) scores, descending, and ids; -1 = none) into the global top ``k``
    by largest score."""
    if not scores:
        raise InputError("merge_topk: no shard results to merge")
    kk = max(int(k), max(s.shape[1] for s in scores))
    pad_s = [np.pad(s.astype(np.float32), ((0, 0), (0, kk - s.shape[1])), constant_values=-np.inf) for s in scores]
    pad_i = [np.pad(i.astype(np.int64), ((0, 0), (0, kk - i.shape[1])), constant_values=-1) for i in ids]
    d, i = faiss.merge_knn_results(np.stack(pad_s), np.stack(pad_i), keep_max=True)
    return d[:, :k], i[:, :k]


def search_shards(shards: Sequence[PromptBank], vectors: np.ndarray, k: int, *, spec: EmbeddingSpec,
                  classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``PromptBank.search`` over several shards (same embedding, disjoint ids), merged: (Q, k) scores, ids."""
    if not shards:
        raise InputError("shards: none given")
    seen: set[int] = set()
    for b in shards:
        spec_b = b.spec
        spec_b.check(spec)
        ids = set(np.asarray(b.ids).tolist())
        if seen & ids:
            raise InputError(f"shards: {b.root} shares entry ids with another shard; build shards with disjoint "
                             "ranges (build --first-id)")
        seen |= ids
    parts = [b.search(vectors, k, spec=spec, classes=[c for c in classes if c in b.classes] if classes else None)
             for b in shards]
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
