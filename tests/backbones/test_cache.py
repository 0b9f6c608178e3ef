"""Feature cache: keys, LRU eviction, disk layer, and the DINOv2 / SAM helpers (hits skip the encoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incontext.backbones import build_backbone
from incontext.backbones.cache import FeatureCache, cached_dino_tokens, cached_sam_embedding, image_digest
from incontext.errors import InputError


def _img(seed, hw=(28, 28)):
    return np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def test_digest_depends_on_content_and_shape_only():
    a = _img(0)
    assert image_digest(a) == image_digest(np.asfortranarray(a)) == image_digest(a.copy())
    assert image_digest(a) != image_digest(_img(1))
    assert image_digest(a) != image_digest(a.reshape(14, 56, 3))
    assert image_digest(b"abc") != image_digest(np.frombuffer(b"abc", np.uint8))
    k1, k2 = FeatureCache.key(a, "dino@x", 518), FeatureCache.key(a, "dino@x", (518, 518))
    assert k1 == k2 and k1 != FeatureCache.key(a, "dino@y", 518) and k1 != FeatureCache.key(a, "dino@x", 448)


def test_lru_eviction_and_counters():
    c = FeatureCache(max_items=2)
    keys = [FeatureCache.key(_img(i), "b", 14) for i in range(3)]
    for i, k in enumerate(keys[:2]):
        c.put(k, {"t": torch.full((2,), float(i))})
    assert c.get(keys[0])["t"][0] == 0  # touch 0 -> 1 is now least recent
    c.put(keys[2], {"t": torch.zeros(2)})
    assert keys[1] not in c and keys[0] in c and keys[2] in c
    assert c.get(keys[1]) is None
    assert (c.hits, c.misses, len(c)) == (1, 1, 2)
    calls = []
    v = c.get_or_compute(keys[1], lambda: calls.append(1) or {"t": torch.ones(2)})
    v2 = c.get_or_compute(keys[1], lambda: calls.append(1) or {"t": torch.ones(2)})
    assert calls == [1] and v2 is v
    with pytest.raises(InputError):
        c.put(keys[0], {})


def test_byte_bound():
    c = FeatureCache(max_items=10, max_bytes=100)
    for i in range(3):
        c.put(FeatureCache.key(_img(i), "b", 1), {"t": torch.zeros(10)})  # 40 bytes each
    assert len(c) == 2


def test_disk_layer_survives_a_new_cache(tmp_path):
    k = FeatureCache.key(_img(0), "sam_tiny@seed0", "sam1024")
    FeatureCache(disk_dir=tmp_path).put(k, {"features": torch.arange(6.0).reshape(2, 3)})
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))
    fresh = FeatureCache(max_items=0, disk_dir=tmp_path)
    got = fresh.get(k)
    assert torch.equal(got["features"], torch.arange(6.0).reshape(2, 3)) and fresh.disk_hits == 1


def test_dino_helper_encodes_once():
    feats = build_backbone("dinov2_tiny")
    cache = FeatureCache()
    img = _img(3, (40, 50))
    calls = []
    orig = feats.patch_tokens
    feats.patch_tokens = lambda *a, **k: calls.append(1) or orig(*a, **k)
    a = cached_dino_tokens(cache, feats, img, size=56)
    b = cached_dino_tokens(cache, feats, img.copy(), size=56)
    c = cached_dino_tokens(cache, feats, img, size=70)  # other resolution -> miss
    assert len(calls) == 2 and a is b and a["prenorm"].shape == (16, 64) and c["prenorm"].shape == (25, 64)
    direct = orig(feats.preprocess(img, size=56))
    torch.testing.assert_close(a["prenorm"], direct["prenorm"][0])


def test_sam_helper_skips_the_encoder_on_a_hit():
    pred = build_backbone("sam_tiny")
    cache = FeatureCache()
    img = _img(4, (30, 40))
    e1 = cached_sam_embedding(cache, pred, img)
    pts = np.array([[[10.0, 12.0]]])
    r1 = pred.decode(pts)
    pred.reset_image()
    encoder_calls = []
    handle = pred.model.image_encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    try:
        e2 = cached_sam_embedding(cache, pred, img)
    finally:
        handle.remove()
    assert encoder_calls == [] and cache.hits == 1
    assert e2.original_size == (30, 40) and e2.input_size == e1.input_size
    torch.testing.assert_close(pred.decode(pts).low_res_logits, r1.low_res_logits)
