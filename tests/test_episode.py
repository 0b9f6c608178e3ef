import numpy as np
import pytest
import torch

from incontext import Context, Episode, InputError, Support
from tests.conftest import disc_image


def test_support_normalises_forms():
    img, mask = disc_image()
    s = Support(torch.from_numpy(img).permute(2, 0, 1).float() / 255, mask.astype(bool))
    assert s.image.dtype == np.uint8 and s.image.shape == (96, 128, 3)
    assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
    assert s.classes == [1]
    s255 = Support(img, mask * 255)
    assert np.array_equal(s255.mask, s.mask)


def test_support_multiclass_and_binary_view():
    img, mask = disc_image()
    labels = mask.copy()
    labels[:10, :10] = 2
    s = Support(img, labels)
    assert s.classes == [1, 2]
    assert set(np.unique(s.binary(2).mask)) == {0, 1}
    assert s.binary(2).mask.sum() == 100


def test_support_size_mismatch_names_fix():
    img, mask = disc_image()
    with pytest.raises(InputError, match="resize_masks"):
        Support(img, mask[:50], name="support 2")
    s = Support(img, mask[::2, ::2], resize_masks=True)
    assert s.mask.shape == img.shape[:2]


def test_support_empty_mask_refused():
    img, mask = disc_image()
    with pytest.raises(InputError, match="empty"):
        Support(img, np.zeros_like(mask))


def test_episode_accepts_pairs_and_rejects_garbage():
    q, _ = disc_image(seed=3)
    s, m = disc_image(seed=4)
    ep = Episode(q, [(s, m)])
    assert ep.classes == [1] and len(ep.supports) == 1
    with pytest.raises(InputError, match="supports\\[0\\]"):
        Episode(q, ["not-a-pair"])


def test_context_round_trip(tmp_path):
    ctx = Context("prototype", {"c1.fg": torch.randn(2, 3)}, {"classes": [1], "note": "x"})
    path = ctx.save(tmp_path / "c.safetensors")
    back = Context.load(path)
    assert back.method == "prototype" and back.meta == ctx.meta
    assert torch.equal(back.tensors["c1.fg"], ctx.tensors["c1.fg"])


def test_context_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(InputError, match="Context.save"):
        Context.load(bad)
    with pytest.raises(InputError, match="no file"):
        Context.load(tmp_path / "missing.safetensors")
