"""A FAISS index over L2-normalised vectors with stable int64 ids.

Cosine similarity is the inner product of unit vectors, so every index is built with
``METRIC_INNER_PRODUCT`` from a FAISS factory string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,Flat"``,
``"IVF4096,PQ32"``, ...). Ids are the prompt bank's row ids: IVF indexes store them natively; every other kind is
wrapped in ``IndexIDMap2`` (an IDMap over an IVF index would break on removal, because IVF does not renumber
its internal ids the way IDMap assumes).

What FAISS cannot do for some index kinds is handled here, so callers see one behaviour:

* removal: HNSW has no ``remove_ids``; :meth:`VectorIndex.remove` reports that and the bank rebuilds the index
  from its stored vectors;
* restricted search (class filter): an ``IDSelector`` in search parameters of the right type for the index
  (IVF / HNSW / flat); kinds without selector support (plain PQ) fall back to over-fetching and filtering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import faiss
import numpy as np

from incontext.errors import InputError

__all__ = ["IndexConfig", "VectorIndex", "normalize_rows"]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> float32 C-contiguous copy with unit L2 rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise InputError(f"vectors: expected a 2-D array (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


@dataclass
class IndexConfig:
    """How the bank's FAISS index is built and searched.

    Attributes:
        factory: FAISS factory string, or ``"auto"`` = ``"Flat"`` up to ``auto_flat_max`` vectors at the first
            build, else ``"IVF{n},Flat"`` with n ≈ 4·√N rounded to a power of two (the FAISS wiki's guideline
            of 4·√N to 16·√N lists).
        nprobe: IVF lists visited per query (FAISS default is 1; far too low for recall).
        ef_search: HNSW candidate-list size at search time (FAISS default 16).
        train_size: at most this many vectors are used to train IVF/PQ (k-means subsamples beyond
            256 points per centroid anyway).
        train_iters: k-means iterations for the IVF centroids (FAISS's default is 25; training time is linear
            in it; see benchmarks/bank_speed.py for the recall it costs).
        auto_flat_max: see ``factory="auto"``.
        k_factor: for factories ending in a refinement (``...,RFlat`` / ``...,Refine(SQ8)``): candidates
            re-ranked per result (FAISS's default of 1 re-ranks nothing).
        exact_subset_max: a class-restricted search over at most this many entries is done exactly on the
            stored vectors (cheaper and exact; approximate indexes lose recall under very selective filters).
    """

    factory: str = "Flat"
    nprobe: int = 32
    ef_search: int = 64
    train_size: int = 262_144
    train_iters: int = 10
    auto_flat_max: int = 200_000
    k_factor: int = 4
    exact_subset_max: int = 20_000

    def resolve(self, n: int) -> str:
        """The concrete factory string for a first build of ``n`` vectors."""
        if self.factory != "auto":
            return self.factory
        if n <= self.auto_flat_max:
            return "Flat"
        nlist = 1 << max(4, int(round(np.log2(4 * np.sqrt(n)))))
        return f"IVF{nlist},Flat"


def _ivf_lists(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


class VectorIndex:
    """FAISS inner-product index with external int64 ids.

    Args:
        dim: vector dimension D.
        factory: a concrete FAISS factory string (see ``IndexConfig``).
        nprobe, ef_search: search-time settings (applied when the index kind has them).
        index: an existing FAISS index (from :meth:`from_bytes`); built from ``factory`` when None.
    """

    def __init__(
        self, dim: int, factory: str, nprobe: int = 32, ef_search: int = 64, index: faiss.Index | None = None,
        train_iters: int = 10, k_factor: int = 4,
    ) -> None:
        self.dim = int(dim)
        self.factory = factory
        self.nprobe = int(nprobe)
        self.ef_search = int(ef_search)
        self.k_factor = int(k_factor)
        if index is None:
            try:
                inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise InputError(
                    f"index.factory: FAISS cannot build {factory!r} for dimension {dim} ({_first_line(exc)}); "
                    "use a factory string such as 'Flat', 'HNSW32', 'IVF1024,Flat' or 'IVF4096,PQ32' "
                    "(PQ's sub-quantizer count must divide the dimension)"
                ) from exc
            _no_polysemous(inner)
            if self._is_ivf(inner):
                faiss.extract_index_ivf(inner).cp.niter = int(train_iters)
            index = inner if _native_ids(inner) else faiss.IndexIDMap2(inner)
        if index.d != self.dim:
            raise InputError(f"index: stored index has dimension {index.d}, bank vectors have {self.dim}")
        self.index = index
        self._apply_search_settings()

    # ------------------------------------------------------------------ kind
    @staticmethod
    def _is_ivf(index: faiss.Index) -> bool:
        try:
            faiss.extract_index_ivf(index)
            return True
        except RuntimeError:
            return False

    def _inner(self) -> faiss.Index:
        """The index below the IDMap wrapper (or the index itself for IVF)."""
        if isinstance(self.index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.downcast_index(self.index.index)
        return self.index

    @property
    def kind(self) -> str:
        """``"ivf"``, ``"hnsw"``, ``"flat"`` or ``"other"``."""
        if self._is_ivf(self.index):
            return "ivf"
        inner = self._inner()
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
        return "other"

    def _apply_search_settings(self) -> None:
        ps = faiss.ParameterSpace()
        if self.kind == "ivf":
            ps.set_index_parameter(self.index, "nprobe", self.nprobe)
        elif self.kind == "hnsw":
            self._inner().hnsw.efSearch = self.ef_search
        if isinstance(self._inner(), faiss.IndexRefine):
            ps.set_index_parameter(self.index, "k_factor_rf", self.k_factor)

    # ------------------------------------------------------------------ state
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def min_train(self) -> int:
        """Fewest training vectors this factory accepts (one per IVF list; PQ needs 256 per code book)."""
        need = 1
        lists = _ivf_lists(self.factory)
        if lists:
            need = max(need, lists)
        if "PQ" in self.factory:
            need = max(need, 256)
        return need

    def train(self, vectors: np.ndarray, max_size: int, seed: int = 0) -> None:
        """Train on (a random subset of at most ``max_size`` of) unit ``vectors`` (N, D)."""
        if self.is_trained:
            return
        n = len(vectors)
        if n < self.min_train():
            raise InputError(
                f"index.factory={self.factory!r} must be trained on at least {self.min_train()} vectors but the bank "
                f"has {n}; use index.factory=Flat (exact, best for banks up to ~10^6 entries) or fewer IVF lists"
            )
        if n > max_size:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=max_size, replace=False))
            vectors = vectors[rows]
        self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add unit vectors (N, D) with int64 ids (N,); the index must be trained."""
        if not self.is_trained:
            raise AssertionError("VectorIndex.add before train")
        if len(vectors):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; False when this index kind cannot remove (the caller rebuilds instead)."""
        if self.kind == "hnsw":
            return False
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        except RuntimeError:
            return False
        return True

    def empty_like(self) -> "VectorIndex":
        """An empty index of the same factory that keeps any training (IVF centroids, PQ code books)."""
        if self.kind in ("flat", "hnsw"):
            return VectorIndex(self.dim, self.factory, self.nprobe, self.ef_search, k_factor=self.k_factor)
        clone = faiss.clone_index(self.index)
        clone.reset()
        return VectorIndex(self.dim, self.factory, self.nprobe, self.ef_search, index=clone, k_factor=self.k_factor)

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products.

        Args:
            queries: (Q, D) unit vectors.
            k: neighbours per query.
            allowed: optional int64 ids to restrict the search to.

        Returns:
            scores (Q, k) float32 descending and ids (Q, k) int64; missing results are id -1, score -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = int(k)
        if allowed is None:
            scores, ids = self.index.search(q, k)
        else:
            params = self._params(faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
            try:
                if params is None:
                    raise RuntimeError("no selector support")
                scores, ids = self.index.search(q, k, params=params)
            except RuntimeError:  # index kinds whose search takes other parameter types (e.g. IndexRefine)
                scores, ids = self._search_overfetch(q, k, np.asarray(allowed, dtype=np.int64))
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids

    def _params(self, sel: faiss.IDSelector) -> faiss.SearchParameters | None:
        if isinstance(self._inner(), faiss.IndexRefine):
            return None
        kind = self.kind
        if kind == "ivf":
            p = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        elif kind == "hnsw":
            p = faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        elif kind == "flat":
            p = faiss.SearchParameters(sel=sel)
        else:
            return None
        p._keep_selector = sel  # the SWIG object does not own the selector; keep it alive with the params
        return p

    def _search_overfetch(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        allowed_set = set(allowed.tolist())
        fetch = min(self.ntotal, max(4 * k, k * self.ntotal // max(1, len(allowed)) * 2))
        while True:
            s, i = self.index.search(q, max(1, fetch))
            keep = np.isin(i, allowed)
            if fetch >= self.ntotal or keep.sum(1).min() >= min(k, len(allowed_set)):
                break
            fetch = min(self.ntotal, fetch * 4)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            sel = np.flatnonzero(keep[r])[:k]
            out_s[r, : len(sel)] = s[r, sel]
            out_i[r, : len(sel)] = i[r, sel]
        return out_s, out_i

    # ------------------------------------------------------------------ io
    def to_bytes(self) -> bytes:
        """The serialized FAISS index (``faiss.serialize_index``)."""
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(
        cls, data: bytes, dim: int, factory: str, nprobe: int = 32, ef_search: int = 64, k_factor: int = 4
    ) -> "VectorIndex":
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(dim, factory, nprobe, ef_search, index=index, k_factor=k_factor)

    def ids(self) -> np.ndarray | None:
        """All stored ids when the index kind keeps a map (IDMap2), else None."""
        if isinstance(self.index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return None


def _native_ids(index: faiss.Index) -> bool:
    """True when ``add_with_ids``/``remove_ids`` work on ``index`` itself: an IVF index, possibly behind
    pre-transforms (OPQ, PCA). Refine wrappers and everything else go inside ``IndexIDMap2``."""
    node = faiss.downcast_index(index)
    while isinstance(node, faiss.IndexPreTransform):
        node = faiss.downcast_index(node.index)
    return isinstance(node, faiss.IndexIVF)


def _no_polysemous(index: faiss.Index) -> None:
    """Turn off the polysemous-code training that ``index_factory`` enables for PQ indexes: it only serves
    Hamming-filtered search, which the bank never uses, and it dominates PQ training time."""
    node = faiss.downcast_index(index)
    while node is not None:
        if hasattr(node, "do_polysemous_training"):
            node.do_polysemous_training = False
        sub = getattr(node, "index", None)
        node = faiss.downcast_index(sub) if isinstance(sub, faiss.Index) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
