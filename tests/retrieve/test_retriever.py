"""Retriever: the pipeline's retrieve stage, class inference, MMR, concept ranking."""

from __future__ import annotations

import numpy as np
import pytest

from incontext.episode import Support
from incontext.errors import InputError
from incontext.retrieve import PromptBank, Retriever, load_retriever

from .conftest import concept_pair


@pytest.fixture(scope="module")
def bank(saved_bank) -> PromptBank:
    return PromptBank.load(saved_bank)


def test_retrieve_without_supports_picks_the_query_concept(bank):
    r = Retriever(bank)
    for name in ("red_stripes", "green_dots", "blue_checks"):
        query, _ = concept_pair(name, 4242)
        sups = r.retrieve(query, [], 3)
        assert len(sups) == 3 and all(isinstance(s, Support) for s in sups)
        assert all(s.name.startswith(f"bank:{name}/") for s in sups), [s.name for s in sups]
        assert all(set(np.unique(s.mask)) == {0, 1} for s in sups)


def test_retrieve_follows_given_supports_and_skips_them(bank):
    r = Retriever(bank)
    query, _ = concept_pair("red_stripes", 4243)
    given = Support(*concept_pair("green_dots", 7))  # not in the bank: class from the nearest prototype
    sups = r.retrieve(query, [given], 2)
    assert all(s.name.startswith("bank:green_dots/") for s in sups)
    from_bank = bank.support(bank.class_ids("blue_checks")[0])
    sups = r.retrieve(query, [from_bank], 3)
    assert all(s.name.startswith("bank:blue_checks/") for s in sups)
    assert not any(np.array_equal(s.image, from_bank.image) for s in sups), "returned a given support again"


def test_rerank_and_mmr(bank):
    query, _ = concept_pair("blue_checks", 99)
    plain = Retriever(bank, rerank_weight=0.0).search(query, 4)
    assert all(h.object_score is None for h in plain)
    assert [h.score for h in plain] == sorted((h.score for h in plain), reverse=True)
    rr = Retriever(bank, rerank_weight=1.0).search(query, 4)
    assert all(abs(h.score - h.object_score) < 1e-6 for h in rr)
    relevance_only = Retriever(bank, mmr_lambda=1.0).search(query, 4)
    assert [h.id for h in relevance_only] == [h.id for h in Retriever(bank).search(query, 4)]
    diverse = Retriever(bank, mmr_lambda=0.0, shortlist=12).search(query, 3)
    # lambda = 0 after the first pick chooses the least redundant objects: other classes.
    assert len({h.cls for h in diverse}) == 3


def test_rank_concepts(bank):
    r = Retriever(bank)
    for name in ("red_stripes", "green_dots", "blue_checks"):
        ranked = r.rank_concepts(concept_pair(name, 555)[0])
        assert [c.cls for c in ranked][0] == name and len(ranked) == 3
        assert ranked[0].score > ranked[1].score and ranked[0].entries == 4
    assert len(r.rank_concepts(concept_pair("red_stripes", 1)[0], top=1)) == 1


def test_settings_are_validated(bank):
    with pytest.raises(InputError, match="rerank_weight"):
        Retriever(bank, rerank_weight=2)
    with pytest.raises(InputError, match="mmr_lambda"):
        Retriever(bank, mmr_lambda=-0.1)
    with pytest.raises(InputError, match="k: 0"):
        Retriever(bank).search(concept_pair("red_stripes", 1)[0], 0)


def test_pipeline_segments_with_retrieved_supports(saved_bank):
    from incontext.registry import build

    # The bank enters a method's config as a node, the way infer.py's bank= does it.
    model = build("prototype", retriever={"_target_": "incontext.retrieve.load_retriever", "bank": str(saved_bank)},
                  shots=2)
    query, truth = concept_pair("red_stripes", 2024)
    pred = model.segment(query, [])
    names = pred.extras["retrieved_supports"]
    assert len(names) == 2 and all(n.startswith("bank:red_stripes/") for n in names)
    iou = ((pred.mask > 0) & (truth > 0)).sum() / ((pred.mask > 0) | (truth > 0)).sum()
    assert iou > 0.5, iou


def test_load_retriever_overrides(saved_bank):
    r = load_retriever(saved_bank, shortlist=7, mmr_lambda=0.5)
    assert r.shortlist == 7 and r.mmr_lambda == 0.5 and r.rerank_weight == 0.5
