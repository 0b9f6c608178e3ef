"""The PerSAM parity runner's input reading (incontext/parity/persam.py): mask rules, mismatched
extensions,
clear errors. The fixture comparisons themselves are in tests/test_parity_persam.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from incontext.errors import InputError
from incontext.parity.persam import load_case, read_rgb, reference_red_channel
from tests.conftest import disc_image


def _mask_files(tmp_path):
    _, m = disc_image(h=60, w=80, r=0.3)
    palette = Image.fromarray(m.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # PerSeg: index 1 = (128, 0, 0)
    palette.save(tmp_path / "perseg.png")
    rgb = np.zeros(m.shape + (3,), np.uint8)
    rgb[m > 0] = (255, 255, 255)
    Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(1.5)).save(
        tmp_path / "aa.png"
    )  # anti-aliased
    return m > 0


def test_mask_rules(tmp_path):
    fg = _mask_files(tmp_path)
    perseg = reference_red_channel(
        tmp_path / "perseg.png", "PerSeg palette PNG: cv2.imread -> RGB, red channel > 0"
    )
    assert set(np.unique(perseg)) == {0, 128}
    np.testing.assert_array_equal(perseg > 0, fg)
    np.testing.assert_array_equal(
        reference_red_channel(tmp_path / "perseg.png", "palette_index>0"), perseg
    )
    aa_raw = np.asarray(Image.open(tmp_path / "aa.png"))
    assert len(np.unique(aa_raw)) > 10  # really anti-aliased
    for rule in ("rgb_any>127", "RGB mask binarised: any channel > 127, written as (128,0,0)"):
        red = reference_red_channel(tmp_path / "aa.png", rule)
        assert set(np.unique(red)) == {0, 128}
        np.testing.assert_array_equal(red > 0, (aa_raw > 127).any(-1))
    low = reference_red_channel(tmp_path / "aa.png", "any channel > 20")
    assert (low > 0).sum() > (reference_red_channel(tmp_path / "aa.png", "rgb_any>127") > 0).sum()


def test_extension_does_not_matter_and_errors_are_clear(tmp_path):
    img, _ = disc_image(h=40, w=50)
    Image.fromarray(img).save(tmp_path / "really_png.jpg", format="PNG")
    np.testing.assert_array_equal(read_rgb(tmp_path / "really_png.jpg", "image"), img)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot decode"):
        read_rgb(tmp_path / "broken.jpg", "query image")
    with pytest.raises(InputError, match="no meta.json"):
        load_case(tmp_path)
    (tmp_path / "meta.json").write_text(
        json.dumps({"inputs": {"ref_image": {"file": "inputs/missing.jpg"}}})
    )
    with pytest.raises(InputError, match="does not exist"):
        load_case(tmp_path)
