"""The retrieve stage: choose supports for a query from a prompt bank, and rank a bank's concepts.

For a query image (no mask) the retriever

1. embeds it with the bank's own embedder (so the embedding always matches the bank's);
2. shortlists ``shortlist`` entries by cosine of image-level vectors through the FAISS index — restricted to
   the requested classes when given (the few-shot protocol: the best examples of the target class) and never
   an entry whose image has the query's content hash (the query itself);
3. re-ranks the shortlist with an object-level score: the mean of the top ``cell_fraction`` of the query's
   grid-cell similarities to each entry's mask-pooled object vector — "does this example's object appear
   somewhere in the query?", the matching signal of Matcher/PerSAM, cheap because only the shortlist is scored;
   final score = (1 - rerank_weight) * image score + rerank_weight * object score;
4. optionally diversifies with maximal marginal relevance (``mmr_lambda``): each next pick maximises
   ``lambda * score - (1 - lambda) * max cosine to the objects already picked``.

Without a class, the target class is the one with the highest summed final score among the top
``class_vote`` hits (a weighted k-NN vote), and the k supports then come from that class, so an episode never
mixes concepts. Supports given by the user fix the class instead (their bank entry when they come from the
bank, else the nearest class prototype of their masked object).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from incontext.errors import InputError
from incontext.retrieve.bank import PromptBank
from incontext.retrieve.embed import QueryEmbedding, content_hash

__all__ = ["ConceptScore", "Hit", "Retriever", "load_retriever"]


@dataclass
class Hit:
    """One retrieved entry.

    Attributes:
        id: the entry's id in the bank.
        score: final score (higher is better).
        image_score: cosine of image-level vectors.
        object_score: object-level score (None when re-ranking is off).
        cls: the entry's class.
        source: the entry's original file.
    """

    id: int
    score: float
    image_score: float
    object_score: float | None
    cls: str
    source: str


@dataclass
class ConceptScore:
    """A class of the bank scored for a query: ``score`` = mean of the top ``cell_fraction`` of the query
    cells' cosines to the class prototype (mean object vector)."""

    cls: str
    score: float
    entries: int


def _top_fraction_mean(sims: np.ndarray, fraction: float) -> np.ndarray:
    """(M, n) -> (n,): mean of the top ceil(fraction * M) values of each column."""
    m = sims.shape[0]
    t = max(1, min(m, int(math.ceil(fraction * m))))
    part = np.partition(sims, m - t, axis=0)[m - t:]
    return part.mean(0)


class Retriever:
    """Chooses supports for queries from a ``PromptBank`` (the pipeline's ``retrieve`` stage).

    Args:
        bank: a loaded bank (or its folder).
        shortlist: entries scored by the re-ranker (the published retrievers keep a pool of 50).
        rerank_weight: weight of the object-level score in the final score (0 = image cosine only).
        cell_fraction: fraction of query cells averaged in object-level and concept scores.
        mmr_lambda: None = no diversification; else the MMR trade-off in [0, 1] (1 = relevance only).
        class_vote: hits that vote for the class when none is given.
        verify_files: check that a retrieved image still has the pixels it was embedded from.
    """

    def __init__(
        self,
        bank: PromptBank | str | os.PathLike,
        shortlist: int = 50,
        rerank_weight: float = 0.5,
        cell_fraction: float = 0.05,
        mmr_lambda: float | None = None,
        class_vote: int = 10,
        verify_files: bool = True,
    ) -> None:
        self.bank = bank if isinstance(bank, PromptBank) else PromptBank.load(bank)
        self.shortlist = max(1, int(shortlist))
        if not 0.0 <= float(rerank_weight) <= 1.0:
            raise InputError(f"retriever.rerank_weight={rerank_weight}; use a value in [0, 1]")
        self.rerank_weight = float(rerank_weight)
        if not 0.0 < float(cell_fraction) <= 1.0:
            raise InputError(f"retriever.cell_fraction={cell_fraction}; use a value in (0, 1]")
        self.cell_fraction = float(cell_fraction)
        if mmr_lambda is not None and not 0.0 <= float(mmr_lambda) <= 1.0:
            raise InputError(f"retriever.mmr_lambda={mmr_lambda}; use null (off) or a value in [0, 1]")
        self.mmr_lambda = None if mmr_lambda is None else float(mmr_lambda)
        self.class_vote = max(1, int(class_vote))
        self.verify_files = bool(verify_files)

    # ------------------------------------------------------------------ queries
    def embed(self, query: Any) -> QueryEmbedding:
        """Embed a query (any image form ``read_image`` accepts) with the bank's embedder."""
        from incontext.io import read_image

        return self.bank.embedder.query(read_image(query, name="query"))

    def search(
        self,
        query: Any,
        k: int,
        classes: Sequence[str] | None = None,
        exclude_ids: Sequence[int] = (),
        embedding: QueryEmbedding | None = None,
    ) -> list[Hit]:
        """Top-``k`` entries for ``query`` (see the module docstring), best first.

        Args:
            query: image (path, array, ...); ignored when ``embedding`` is given.
            k: number of hits (fewer when the allowed pool is smaller).
            classes: restrict to these classes (None = all).
            exclude_ids: ids never to return (entries with the query's content hash are always excluded).
            embedding: a precomputed ``QueryEmbedding`` (its spec must be the bank's).
        """
        qe = embedding if embedding is not None else self.embed(query)
        k = int(k)
        if k < 1:
            raise InputError(f"k: {k}; ask for at least one support")
        excl = set(int(i) for i in exclude_ids) | set(self.bank.ids_with_hash(qe.sha1))
        wide = self.rerank_weight > 0 or self.mmr_lambda is not None
        pool = max(self.shortlist, k) if wide else k
        img_s, ids = self.bank.search(qe.vector, pool, spec=qe.spec, classes=classes, exclude_ids=excl)
        valid = ids[0] >= 0
        ids, img_s = ids[0][valid], img_s[0][valid]
        if not len(ids):
            return []
        rows = self.bank.rows(ids)
        obj_vecs = np.asarray(self.bank.object_vecs)[rows]
        obj_s = None
        final = img_s.astype(np.float64)
        if self.rerank_weight > 0:
            obj_s = _top_fraction_mean(qe.cells @ obj_vecs.T, self.cell_fraction)
            final = (1 - self.rerank_weight) * img_s + self.rerank_weight * obj_s
        order = self._select(final, obj_vecs, k)
        out = []
        for j in order:
            e = self.bank.entry(int(ids[j]))
            out.append(Hit(id=e.id, score=float(final[j]), image_score=float(img_s[j]),
                           object_score=None if obj_s is None else float(obj_s[j]), cls=e.cls, source=e.source))
        return out

    def _select(self, scores: np.ndarray, obj_vecs: np.ndarray, k: int) -> list[int]:
        if self.mmr_lambda is None:
            return list(np.argsort(-scores, kind="stable")[:k])
        lam = self.mmr_lambda
        chosen: list[int] = []
        redundancy = np.full(len(scores), -np.inf)
        left = np.ones(len(scores), bool)
        for _ in range(min(k, len(scores))):
            value = lam * scores - (1 - lam) * np.where(np.isneginf(redundancy), 0.0, redundancy)
            value = np.where(left, value, -np.inf)
            j = int(np.argmax(value))
            chosen.append(j)
            left[j] = False
            redundancy = np.maximum(redundancy, obj_vecs @ obj_vecs[j])
        return chosen

    # ------------------------------------------------------------------ classes and concepts
    def rank_concepts(self, query: Any, top: int | None = None, embedding: QueryEmbedding | None = None
                      ) -> list[ConceptScore]:
        """Which of the bank's concepts are in this image: every class scored against the query's cells,
        best first (``top`` = keep only that many)."""
        qe = embedding if embedding is not None else self.embed(query)
        names, protos = self.bank.class_prototypes()
        if not names:
            return []
        scores = _top_fraction_mean(qe.cells @ protos.T, self.cell_fraction)
        order = np.argsort(-scores, kind="stable")[: top or len(names)]
        return [ConceptScore(names[j], float(scores[j]), int(len(self.bank.class_ids(names[j])))) for j in order]

    def vote_class(self, query: Any, embedding: QueryEmbedding | None = None) -> str:
        """The class of the query by a score-weighted vote of its top ``class_vote`` hits over all classes."""
        hits = self.search(query, self.class_vote, embedding=embedding)
        if not hits:
            raise InputError(f"bank {self.bank.root} is empty; add examples before retrieving from it")
        totals: dict[str, float] = {}
        for h in hits:
            totals[h.cls] = totals.get(h.cls, 0.0) + h.score
        return max(totals, key=lambda c: totals[c])

    def support_class(self, support: Any) -> str:
        """The bank class of a given support: its own entry's class when its image is in the bank, else the
        class whose prototype is nearest to its masked object."""
        for i in self.bank.ids_with_hash(content_hash(support.image)):
            e = self.bank.entry(i)
            if e.mask_sha1 == content_hash(support.image, support.mask > 0):
                return e.cls
        names, protos = self.bank.class_prototypes()
        if not names:
            raise InputError(f"bank {self.bank.root} is empty; add examples before retrieving from it")
        v = self.bank.embedder.object_vector(support.image, support.mask > 0)
        return names[int(np.argmax(protos @ v))]

    # ------------------------------------------------------------------ the pipeline's Retriever protocol
    def retrieve(self, query: np.ndarray, supports: Sequence[Any], k: int) -> list[Any]:
        """``k`` more supports for ``query`` ((H, W, 3) uint8), never the query itself nor a given support.

        The class comes from the given supports (majority of ``support_class``) or, with none, from
        ``vote_class``. Returns ``Support`` objects with 0/1 masks named ``bank:<class>/<file>``.
        """
        if k <= 0:
            return []
        qe = self.bank.embedder.query(np.asarray(query))
        if supports:
            votes: dict[str, int] = {}
            for s in supports:
                c = self.support_class(s)
                votes[c] = votes.get(c, 0) + 1
            cls = max(votes, key=lambda c: votes[c])
        else:
            cls = self.vote_class(None, embedding=qe)
        exclude = [i for s in supports for i in self.bank.ids_with_hash(content_hash(s.image))]
        hits = self.search(None, k, classes=[cls], exclude_ids=exclude, embedding=qe)
        return [self.bank.support(h.id, verify=self.verify_files) for h in hits]


def load_retriever(bank: str | os.PathLike, device: str = "cpu", verify: str = "auto", **overrides: Any
                   ) -> Retriever:
    """Open the bank folder ``bank`` and build its retriever with the settings stored in the bank
    (``retriever`` section of its config), updated by ``overrides``. A relative ``bank`` that is not found
    from the working directory is looked up from the project root (so presets can name ``prompts_bank/...``)."""
    path = Path(bank).expanduser()
    if not path.is_absolute() and not path.exists():
        root = Path(__file__).resolve().parents[2]
        if (root / path).exists():
            path = root / path
    b = PromptBank.load(path, verify=verify, device=device)
    settings = dict(b.config.get("retriever") or {})
    settings.update(overrides)
    return Retriever(b, **settings)
