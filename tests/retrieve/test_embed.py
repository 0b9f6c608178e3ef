"""Embeddings: hashing, fitted standardisation, the DINOv2 option (tiny random weights), config safety."""

from __future__ import annotations

import numpy as np
import pytest

from incontext.errors import InputError
from incontext.retrieve import PromptBank, build_embedder, content_hash, folder_items, load_config

from .conftest import concept_pair

TINY_DINO = {
    "_target_": "incontext.retrieve.embed.FeatureEmbedder",
    "features": {
        "_target_": "incontext.retrieve.embed.DinoV2Dense",
        "model": "dinov2_tiny",
        "arch": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56},
        "weights": "random",
        "size": 56,
    },
    "image_pool": ["cls", "mean"],
    "standardize": False,
    "batch_size": 4,
}


def test_content_hash_is_about_pixels():
    img, mask = concept_pair("red_stripes", 1)
    assert content_hash(img) == content_hash(img.copy())
    assert content_hash(img) != content_hash(img[:, ::-1])
    assert content_hash(img, mask) == content_hash(img, mask * 255)  # 0/1 and 0/255 masks are the same object
    assert content_hash(img, mask) != content_hash(img)


def test_handcrafted_embedder_vectors(fast_config):
    emb = build_embedder(fast_config["embedding"])
    pairs = [concept_pair(n, s) for n in ("red_stripes", "green_dots") for s in range(3)]
    recs = emb.raw([p[0] for p in pairs], [p[1] for p in pairs])
    emb.fit(recs)
    iv, ov = emb.image_vectors(recs), emb.object_vectors(recs)
    assert iv.shape == (6, emb.spec.image_dim) and ov.shape == (6, emb.spec.object_dim)
    assert np.allclose(np.linalg.norm(ov, axis=1), 1, atol=1e-5)
    sims = ov @ ov.T
    # Same-concept objects are closer than cross-concept ones.
    assert sims[:3, :3].min() > sims[:3, 3:].max()
    q = emb.query(pairs[0][0])
    assert q.cells.shape == (q.grid[0] * q.grid[1], emb.spec.object_dim) and q.sha1 == content_hash(pairs[0][0])


def test_spec_changes_with_fitted_statistics(fast_config):
    a, b = build_embedder(fast_config["embedding"]), build_embedder(fast_config["embedding"])
    imgs = [concept_pair("red_stripes", s) for s in range(4)]
    a.fit(a.raw([p[0] for p in imgs[:2]], [None, None]))
    b.fit(b.raw([p[0] for p in imgs[2:]], [None, None]))
    assert a.spec.name == b.spec.name and a.spec.config_hash != b.spec.config_hash


def test_dinov2_option_builds_and_searches(source_dir, tmp_path):
    cfg = load_config("default")
    cfg["embedding"] = TINY_DINO
    bank = PromptBank.create(tmp_path / "b", cfg)
    bank.add(folder_items(source_dir), cache=False, progress=False)
    assert bank.spec.image_dim == 64 and bank.spec.object_dim == 32
    bank.save()
    again = PromptBank.load(tmp_path / "b")
    q = again.embedder.query(concept_pair("blue_checks", 5)[0])
    s, ids = again.search(q.vector, 3, spec=q.spec)
    assert (ids >= 0).all() and np.all(np.diff(s) <= 1e-6)


def test_dinov2_config_without_weights_names_the_file(tmp_path):
    cfg = dict(TINY_DINO, features={**TINY_DINO["features"], "model": "dinov2_vits14", "weights": None,
                                    "arch": None})
    with pytest.raises(FileNotFoundError, match="dinov2_vits14"):
        build_embedder(cfg)


def test_targets_outside_the_package_are_refused():
    with pytest.raises(InputError, match="outside the incontext package"):
        build_embedder({"_target_": "os.system", "command": "true"})
    with pytest.raises(InputError, match="no CLS token"):
        build_embedder({"_target_": "incontext.retrieve.embed.FeatureEmbedder",
                        "features": {"_target_": "incontext.features.HandcraftedFeatures"}, "image_pool": ["cls"]})
