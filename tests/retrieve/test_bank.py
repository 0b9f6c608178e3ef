"""PromptBank: build from a folder, save/load (fresh process), consistency checks, add/remove, search rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incontext.errors import InputError
from incontext.retrieve import CorruptBankError, PromptBank, Retriever, folder_items, load_config
from incontext.retrieve import bank as bank_module
from incontext.retrieve import store as store_module
from incontext.retrieve.embed import EmbeddingSpec, content_hash

from .conftest import FAST, concept_pair

REPO = Path(__file__).resolve().parents[2]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _queries(tmp_path: Path) -> list[str]:
    """Two images not in the bank and one that is."""
    out = []
    for name, seed in (("red_stripes", 901), ("green_dots", 902)):
        img, _ = concept_pair(name, seed)
        p = tmp_path / f"q_{name}.png"
        Image.fromarray(img).save(p)
        out.append(str(p))
    return out


def test_build_counts_and_layout(saved_bank, source_dir):
    bank = PromptBank.load(saved_bank)
    assert len(bank) == 12 and bank.classes == ["blue_checks", "green_dots", "red_stripes"]
    assert (saved_bank / "BANK.json").is_file() and (saved_bank / bank.version / "manifest.json").is_file()
    e = bank.entry(0)
    assert Path(e.image).is_file() and e.source.endswith(".jpg") and 0 < e.fg < 0.5
    # Stored vectors are unit length; object vectors live in the feature space of the grid cells.
    assert np.allclose(np.linalg.norm(bank.image_vecs, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(bank.object_vecs, axis=1), 1, atol=1e-5)
    assert bank.object_vecs.shape[1] == bank.spec.object_dim


def test_reload_in_fresh_process_returns_same_neighbours(saved_bank, source_dir, tmp_path):
    queries = _queries(tmp_path) + [str(source_dir / "blue_checks" / "blue_checks_1.jpg")]
    here = Retriever(PromptBank.load(saved_bank), rerank_weight=0.5)
    expected = [[(h.id, round(h.score, 5)) for h in here.search(q, 5)] for q in queries]
    script = (
        "import json, sys\n"
        "from incontext.retrieve import PromptBank, Retriever\n"
        "r = Retriever(PromptBank.load(sys.argv[1]), rerank_weight=0.5)\n"
        "print(json.dumps([[(h.id, round(h.score, 5)) for h in r.search(q, 5)] for q in sys.argv[2:]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(saved_bank), *queries], capture_output=True, text=True,
                         cwd=REPO, check=True)
    got = [[tuple(x) for x in row] for row in json.loads(out.stdout)]
    assert got == expected
    # The neighbours are meaningful: an unseen red-stripes query finds red-stripes entries first.
    bank = here.bank
    assert bank.entry(expected[0][0][0]).cls == "red_stripes"


@pytest.mark.parametrize("victim", ["index.faiss", "meta.jsonl", "image_emb.npy"])
def test_truncated_bank_is_detected(saved_bank, tmp_path, victim):
    root = _copy(saved_bank, tmp_path / "bank")
    vdir = next(root.glob("v0*"))
    data = (vdir / victim).read_bytes()
    (vdir / victim).write_bytes(data[: len(data) // 2])
    for verify in ("full", "size"):
        with pytest.raises(CorruptBankError, match=victim):
            PromptBank.load(root, verify=verify)


def test_corrupted_bytes_detected_by_checksum(saved_bank, tmp_path):
    root = _copy(saved_bank, tmp_path / "bank")
    p = next(root.glob("v0*")) / "object_emb.npy"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptBankError, match="SHA-256"):
        PromptBank.load(root, verify="full")


def test_missing_pointer_or_file_is_detected(saved_bank, tmp_path):
    root = _copy(saved_bank, tmp_path / "bank")
    (next(root.glob("v0*")) / "ids.npy").unlink()
    with pytest.raises(CorruptBankError, match="ids.npy is missing"):
        PromptBank.load(root)
    (root / "BANK.json").unlink()
    with pytest.raises(CorruptBankError, match="cut off"):
        PromptBank.load(root)
    with pytest.raises(InputError, match="not a prompt bank"):
        PromptBank.load(tmp_path)


def test_crash_during_save_keeps_previous_bank(saved_bank, tmp_path, monkeypatch):
    root = _copy(saved_bank, tmp_path / "bank")
    bank = PromptBank.load(root)
    img, mask = concept_pair("green_dots", 555)
    bank.add([bank_module.BankItem(img, mask, "green_dots")], cache=False, progress=False)
    real = store_module._write_bytes

    def dying(path, data):
        if path.name == "image_emb.npy":
            raise OSError("disk full (simulated)")
        real(path, data)

    monkeypatch.setattr(store_module, "_write_bytes", dying)
    with pytest.raises(OSError, match="simulated"):
        bank.save()
    assert len(PromptBank.load(root)) == 12  # the previous version, complete
    assert not list(root.glob(".v*")), "temporary version folder left behind"
    monkeypatch.setattr(store_module, "_write_bytes", real)
    bank.save()
    assert len(PromptBank.load(root)) == 13


def test_embedding_mismatch_is_refused(saved_bank, source_dir, tmp_path):
    bank = PromptBank.load(saved_bank)
    q = bank.embedder.query(concept_pair("red_stripes", 3)[0])
    other = EmbeddingSpec("dinov2(x)", "0123456789ab", q.spec.image_dim, q.spec.object_dim)
    with pytest.raises(InputError, match="embedded with dinov2"):
        bank.search(q.vector, 3, spec=other)
    # A bank built with another pooling recipe: its query embeddings are refused by the first bank.
    cfg = load_config("default", FAST + ["embedding.image_pool=[mean]"])
    b2 = PromptBank.create(tmp_path / "b2", cfg)
    b2.add(folder_items(source_dir), cache=False, progress=False)
    q2 = b2.embedder.query(concept_pair("red_stripes", 3)[0])
    with pytest.raises(InputError, match="bank was built with"):
        Retriever(bank).search(None, 3, embedding=q2)


def test_query_itself_never_returned(saved_bank, source_dir, tmp_path):
    r = Retriever(PromptBank.load(saved_bank), rerank_weight=0.5)
    n = len(r.bank)
    for e in r.bank.entries:
        hits = r.search(e.source, n)  # ask for everything
        assert len(hits) == n - 1 and e.id not in {h.id for h in hits}
    # Same pixels through another file format are still the query (content hash of decoded pixels).
    e = r.bank.entry(5)
    pixels = np.asarray(Image.open(e.source).convert("RGB"))
    png = tmp_path / "copy.png"
    Image.fromarray(pixels).save(png)
    assert content_hash(pixels) == e.image_sha1
    assert e.id not in {h.id for h in r.search(str(png), n)}
    assert e.id not in {s for s in r.bank.search(r.embed(png).vector, n, spec=r.bank.spec,
                                                 exclude_ids=r.bank.ids_with_hash(e.image_sha1))[1][0]}


def test_class_restricted_search(saved_bank):
    r = Retriever(PromptBank.load(saved_bank))
    hits = r.search(concept_pair("red_stripes", 77)[0], 3, classes=["green_dots"])
    assert [h.cls for h in hits] == ["green_dots"] * 3
    with pytest.raises(InputError, match="did you mean green_dots"):
        r.search(concept_pair("red_stripes", 77)[0], 3, classes=["green_dot"])


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_add_remove_save_reload(saved_bank, tmp_path, factory, source_dir):
    cfg = load_config("default", FAST + [f"index.factory={factory}"])
    bank = PromptBank.create(tmp_path / "b", cfg)
    bank.add(folder_items(source_dir), cache=False, progress=False)
    q = bank.embedder.query(concept_pair("blue_checks", 31)[0])
    before = bank.search(q.vector, 12, spec=q.spec)[1][0]
    gone = [int(before[0]), int(before[1])]
    assert bank.remove(gone) == 2
    after = bank.search(q.vector, 10, spec=q.spec)[1][0]
    assert set(after) == set(before) - set(gone)
    bank.save()
    again = PromptBank.load(tmp_path / "b")
    assert list(again.search(q.vector, 10, spec=q.spec)[1][0]) == list(after)
    img, mask = concept_pair("blue_checks", 32)
    new = again.add([bank_module.BankItem(img, mask, "blue_checks")], cache=False, progress=False)
    assert new == [12], "ids are never reused after removal"
    with pytest.raises(InputError, match="no entry with id"):
        again.remove([gone[0]])


def test_trained_index_needs_enough_vectors(source_dir, tmp_path):
    cfg = load_config("default", FAST + ["index.factory=IVF64,Flat"])
    bank = PromptBank.create(tmp_path / "b", cfg)
    with pytest.raises(InputError, match="index.factory=Flat"):
        bank.add(folder_items(source_dir), cache=False, progress=False)


def test_items_from_arrays_are_copied_into_the_bank(tmp_path, fast_config):
    bank = PromptBank.create(tmp_path / "b", fast_config)
    items = [bank_module.BankItem(*concept_pair(n, s), cls=n) for n in ("red_stripes", "green_dots") for s in (1, 2)]
    bank.add(items, cache=False, progress=False)
    bank.save()
    moved = _copy(tmp_path / "b", tmp_path / "moved")  # a self-contained bank can be moved
    b = PromptBank.load(moved)
    sup = b.support(0)
    assert sup.name.startswith("bank:red_stripes/") and set(np.unique(sup.mask)) == {0, 1}
    assert np.array_equal(sup.image, items[0].image)
    with pytest.raises(InputError, match="already holds a prompt bank"):
        PromptBank.create(moved)


def test_embedding_cache_is_reused(source_dir, tmp_path, fast_config, monkeypatch):
    from incontext.retrieve.embed import FeatureEmbedder

    calls = []
    real = FeatureEmbedder.raw

    def counting(self, images, masks):
        calls.append(len(images))
        return real(self, images, masks)

    monkeypatch.setattr(FeatureEmbedder, "raw", counting)
    b1 = PromptBank.create(tmp_path / "b1", fast_config)
    b1.add(folder_items(source_dir), cache=tmp_path / "cache", progress=False)
    assert sum(calls) == 12
    b2 = PromptBank.create(tmp_path / "b2", fast_config)
    b2.add(folder_items(source_dir), cache=tmp_path / "cache", progress=False)
    assert sum(calls) == 12, "second build recomputed cached embeddings"
    assert np.array_equal(b1.image_vecs, b2.image_vecs) and b1.spec == b2.spec


def test_changed_feature_code_is_refused(saved_bank, tmp_path, monkeypatch):
    from incontext.features import HandcraftedFeatures

    root = _copy(saved_bank, tmp_path / "bank")
    PromptBank.load(root)
    real = HandcraftedFeatures.__call__
    monkeypatch.setattr(HandcraftedFeatures, "__call__", lambda self, image: real(self, image).flip(0))
    with pytest.raises(InputError, match="embedding code now computes different vectors"):
        PromptBank.load(root)


def test_shipped_demo_bank_loads_and_searches():
    bank = PromptBank.load(REPO / "prompts_bank" / "synthetic-mini", verify="full")
    assert len(bank) == 32 and len(bank.classes) == 16
    s, ids = bank.search(bank.image_vecs[:1], 3, spec=bank.spec)
    assert ids[0, 0] == bank.ids[0]
