"""Loaders on every odd format users' files come in (all files are built here with PIL), writers, pair listing."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from incontext.errors import InputError
from incontext.io import (
    atomic_path,
    check_mask_matches_image,
    check_nonempty,
    label_palette,
    load_pairs_from_dir,
    read_image,
    read_mask,
    write_gray_png,
    write_json,
    write_mask_png,
    write_overlay_png,
)

RNG = np.random.default_rng(0)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    """A smooth colour image (compresses predictably, so lossy formats stay close)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 90)], axis=2).astype(np.uint8)


def _save(tmp_path: Path, name: str, im: Image.Image, fmt: str, **kw) -> Path:
    p = tmp_path / name
    im.save(p, format=fmt, **kw)
    return p


# ---------------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "fmt,tol", [("PNG", 0), ("BMP", 0), ("TIFF", 0), ("WEBP", 0), ("JPEG", 12)]
)
def test_formats_round_trip(tmp_path, fmt, tol):
    a = _rgb()
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    p = _save(tmp_path, f"img.{fmt.lower()}", Image.fromarray(a), fmt, **kw)
    out = read_image(p)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - a).max() <= tol


def test_format_from_content_not_extension(tmp_path):
    a = _rgb()
    p = _save(tmp_path, "actually_png.jpg", Image.fromarray(a), "PNG")
    np.testing.assert_array_equal(read_image(p), a)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    out = read_image(p)
    assert out.shape == (8, 10, 3)
    assert tuple(out[4, 5]) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # stored landscape, 40 wide
    a[:, :10] = (255, 0, 0)  # red on the stored left edge
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = _save(tmp_path, "rot.jpg", im, "JPEG", exif=exif, quality=95)
    out = read_image(p)
    assert out.shape == (40, 20, 3)  # displayed portrait
    assert out[2, 10, 0] > 200 and out[-3, 10, 0] < 60  # stored left edge is displayed at the top


def test_alpha_composited_on_black_and_grey_palette_modes(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:3, :, 3] = 0  # transparent top half
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out[:3] == 0).all() and (out[3:] == 200).all()

    la = Image.fromarray(np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 128, np.uint8)], 2), "LA")
    out = read_image(_save(tmp_path, "la.png", la, "PNG"))
    assert out.shape == (4, 4, 3) and abs(int(out[0, 0, 0]) - 50) <= 1

    grey = read_image(_save(tmp_path, "g.png", Image.new("L", (5, 3), 77), "PNG"))
    assert grey.shape == (3, 5, 3) and (grey == 77).all()

    pal = Image.new("P", (5, 3), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    out = read_image(_save(tmp_path, "p.png", pal, "PNG"))
    assert tuple(out[1, 1]) == (10, 20, 30)


def test_16_bit_scaled_properly(tmp_path):
    vals = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(vals)
    assert im.mode.startswith("I;16")
    out = read_image(_save(tmp_path, "deep.png", im, "PNG"))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_in_memory_sources():
    a = _rgb(6, 7)
    np.testing.assert_array_equal(read_image(Image.fromarray(a)), a)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    np.testing.assert_array_equal(read_image(buf.getvalue()), a)
    np.testing.assert_array_equal(read_image(torch.from_numpy(a).permute(2, 0, 1).float() / 255), a)
    np.testing.assert_array_equal(read_image(torch.from_numpy(a).permute(2, 0, 1)), a)
    np.testing.assert_array_equal(read_image(a.astype(np.float32) / 255), a)
    assert read_image(a[..., 0]).shape == (6, 7, 3)


def test_bad_arrays_name_argument():
    with pytest.raises(InputError, match=r"query: float image has values in \[0, 255\]"):
        a = np.full((4, 4, 3), 255.0)
        a[0, 0] = 0.0
        read_image(a, name="query")
    with pytest.raises(InputError, match="query.*channels-first"):
        read_image(np.zeros((3, 8, 8), np.uint8), name="query")
    with pytest.raises(InputError, match="support 1 image: got int, expected a file path"):
        read_image(12, name="support 1 image")


def _png_header_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h: costs nothing to write, would be a bomb to decode."""
    buf = io.BytesIO()
    Image.new("1", (4, 4)).save(buf, "PNG")
    d = bytearray(buf.getvalue())
    d[16:24] = struct.pack(">II", w, h)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])))
    return bytes(d)


@pytest.mark.parametrize("side", [8000, 20000])  # below and above PIL's own bomb limit
def test_pixel_cap_checked_from_header(tmp_path, side):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_claiming(side, side))
    with pytest.raises(InputError) as e:
        read_image(p, name="query")
    msg = str(e.value)
    assert msg.startswith("query: file") and "bomb.png" in msg and "max_pixels=50,000,000" in msg
    assert f"{side * side:,} pixels" in msg
    assert "DecompressionBomb" not in msg
    with pytest.raises(InputError, match="max_pixels=100"):
        read_image(_rgb(), max_pixels=100)


def test_unreadable_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"support 2 image: file '.*empty\.jpg' is empty \(0 bytes\)"):
        read_image(empty, name="support 2 image")

    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    with pytest.raises(InputError, match=r"query: file '.*notes\.png' is not a readable image \(it looks like a text"):
        read_image(text, name="query")

    buf = io.BytesIO()
    Image.fromarray((RNG.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    trunc = tmp_path / "cut.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match=r"query: file '.*cut\.jpg' \(JPEG\) is truncated"):
        read_image(trunc, name="query")

    with pytest.raises(InputError, match=r"query: file '.*missing\.jpg' does not exist"):
        read_image(tmp_path / "missing.jpg", name="query")
    with pytest.raises(InputError, match="is a directory"):
        read_image(tmp_path, name="query")
    with pytest.raises(InputError, match="mask: file .* is empty"):
        read_mask(empty)


# ----------------------------------------------------------------------------------------------------------- masks


def test_perseg_palette_mask(tmp_path):
    idx = np.zeros((10, 12), np.uint8)
    idx[2:6, 3:9] = 1
    im = Image.frombytes("P", (12, 10), idx.tobytes())
    im.putpalette([0, 0, 0, 128, 0, 0] + [0] * (254 * 3))  # PerSeg: foreground colour (128, 0, 0)
    m = read_mask(_save(tmp_path, "m.png", im, "PNG"))
    np.testing.assert_array_equal(m, idx)


def test_palette_index_is_label_and_editor_palette_goes_by_colour(tmp_path):
    idx = np.zeros((12, 12), np.uint8)
    idx[1:5, 1:5] = 15
    idx[7:11, 7:11] = 3
    idx[5, 1:5] = 255  # VOC border
    im = Image.frombytes("P", (12, 12), idx.tobytes())
    im.putpalette(label_palette().ravel().tolist())
    np.testing.assert_array_equal(read_mask(_save(tmp_path, "voc.png", im, "PNG")), idx)

    # an editor saved white at index 0 and black at index 1: go by colour, not by index
    ed = np.ones((8, 8), np.uint8)
    ed[2:6, 2:6] = 0
    im = Image.frombytes("P", (8, 8), ed.tobytes())
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))
    np.testing.assert_array_equal(read_mask(im), (ed == 0).astype(np.uint8))


@pytest.mark.parametrize("fg", [1, 255, 7])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_binary_masks_any_value_depth_channels(tmp_path, fg, bits, channels):
    truth = np.zeros((9, 11), np.uint8)
    truth[3:7, 2:9] = 1
    if bits == 16:
        arr = truth.astype(np.uint16) * (65535 if fg == 255 else fg)
        if channels == 3:  # PIL cannot write 16-bit RGB PNGs: pass the array (as cv2.imread(..., -1) gives it)
            src = np.repeat(arr[..., None], 3, 2)
        else:
            src = _save(tmp_path, "m.png", Image.fromarray(arr), "PNG")
    else:
        arr = truth * fg
        im = Image.fromarray(np.repeat(arr[..., None], 3, 2) if channels == 3 else arr)  # grey saved as RGB
        src = _save(tmp_path, "m.png", im, "PNG")
    m = read_mask(src)
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, truth)


def test_array_masks():
    truth = np.zeros((6, 6), np.uint8)
    truth[1:4, 2:5] = 1
    np.testing.assert_array_equal(read_mask(truth.astype(bool)), truth)
    np.testing.assert_array_equal(read_mask(truth * 0.9 + 0.05), truth)  # float probabilities, > 0.5
    np.testing.assert_array_equal(read_mask(torch.from_numpy(truth)[None]), truth)
    labels = truth.copy()
    labels[5, :] = 2
    np.testing.assert_array_equal(read_mask(labels.astype(np.int64)), labels)
    with pytest.raises(InputError, match="support 1 mask: mask has negative values"):
        read_mask(-labels.astype(np.int64), name="support 1 mask")
    with pytest.raises(InputError, match="float mask has values in"):
        read_mask(truth * 1.5 + 0.2)


def _aa_colour_mask() -> Image.Image:
    """Two colour classes drawn large, then downscaled with LANCZOS: hundreds of blended edge colours."""
    big = Image.new("RGB", (240, 240))
    d = ImageDraw.Draw(big)
    d.ellipse((10, 10, 130, 130), fill=(255, 0, 0))
    d.rectangle((100, 110, 230, 230), fill=(0, 0, 255))
    return big.resize((60, 60), Image.LANCZOS)


def test_antialiased_colour_mask_gives_exactly_two_classes(tmp_path):
    im = _aa_colour_mask()
    assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 50
    m = read_mask(_save(tmp_path, "colour.png", im, "PNG"))
    assert sorted(np.unique(m).tolist()) == [0, 1, 2]
    # not VOC colours: numbered by colour order, blue (0,0,255) before red (255,0,0)
    assert m[5, 30] == 0 and m[17, 17] == 2 and m[50, 50] == 1
    # also through JPEG compression
    mj = read_mask(_save(tmp_path, "colour.jpg", im, "JPEG", quality=75))
    assert sorted(np.unique(mj).tolist()) == [0, 1, 2]
    assert (mj == m).mean() > 0.97


def test_antialiased_grey_and_label_masks():
    big = Image.new("L", (200, 200))
    ImageDraw.Draw(big).ellipse((30, 30, 170, 150), fill=255)
    soft = np.asarray(big.resize((25, 25), Image.BILINEAR))
    assert 2 < len(np.unique(soft))
    m = read_mask(soft)
    assert set(np.unique(m)) == {0, 1}
    hard = (np.asarray(big.resize((25, 25), Image.NEAREST)) > 0).astype(np.uint8)
    assert (m == hard).mean() > 0.95

    lab = Image.new("L", (200, 200))
    d = ImageDraw.Draw(lab)
    d.ellipse((10, 10, 110, 110), fill=1)
    d.rectangle((120, 120, 190, 190), fill=3)
    m = read_mask(np.asarray(lab.resize((40, 40), Image.BILINEAR)))
    assert sorted(np.unique(m).tolist()) == [0, 1, 3]


def test_rgba_mask_and_photo_refused():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (255, 255, 255, 255)
    np.testing.assert_array_equal(read_mask(rgba)[2:6, 2:6], 1)
    photo = (RNG.random((40, 40, 3)) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="support 3 mask: this does not look like a mask but like a photo"):
        read_mask(np.asarray(Image.fromarray(photo).resize((400, 400), Image.BICUBIC)), name="support 3 mask")
    with pytest.raises(InputError, match="support 3 mask: this does not look like a mask but like a photo"):
        read_mask(photo, name="support 3 mask")


def test_mask_size_check_and_resize():
    mask = np.zeros((480, 640), np.uint8)
    mask[100:200, 100:300] = 1
    img = np.zeros((512, 512, 3), np.uint8)
    with pytest.raises(InputError) as e:
        check_mask_matches_image(mask, img, name="support 2")
    assert str(e.value) == (
        "support 2: mask is 480x640 but image is 512x512 (HxW); resize the mask or pass resize_masks=true"
    )
    out = check_mask_matches_image(mask, img, name="support 2", resize=True)
    assert out.shape == (512, 512) and set(np.unique(out)) == {0, 1}
    with pytest.raises(InputError, match="rotated by 90 degrees"):
        check_mask_matches_image(np.zeros((640, 480), np.uint8), (480, 640), name="support 1")
    assert check_mask_matches_image(mask, (480, 640), name="x") is mask


def test_empty_mask_error():
    with pytest.raises(InputError, match="support 1: mask \\(5x6\\) is empty.*drop this support"):
        check_nonempty(np.zeros((5, 6), np.uint8), name="support 1")
    with pytest.raises(InputError):
        check_nonempty(np.full((5, 6), 255, np.uint8), name="support 1")  # only ignore pixels
    check_nonempty(np.eye(4, dtype=np.uint8), name="ok")


# --------------------------------------------------------------------------------------------------------- writers


def test_mask_png_round_trip(tmp_path):
    binary = np.zeros((7, 9), np.uint8)
    binary[2:5, 3:8] = 1
    write_mask_png(tmp_path / "b.png", binary)
    im = Image.open(tmp_path / "b.png")
    assert im.mode == "P" and im.size == (9, 7)
    assert tuple(im.getpalette()[3:6]) == (255, 255, 255)
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), binary)

    multi = binary.copy()
    multi[0, :] = 2
    multi[6, :4] = 5
    write_mask_png(tmp_path / "m.png", multi)
    assert tuple(Image.open(tmp_path / "m.png").getpalette()[3:6]) == (128, 0, 0)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), multi)


def test_overlay_gray_json(tmp_path):
    img = _rgb(20, 30)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 1
    write_overlay_png(tmp_path / "o.png", img, mask, alpha=0.5)
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[0], img[0])  # outside the mask: untouched
    assert not np.array_equal(out[10, 10], img[10, 10])  # inside: tinted
    with pytest.raises(InputError, match="overlay: mask is 4x4 but image is 20x30"):
        write_overlay_png(tmp_path / "bad.png", img, np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "bad.png").exists()

    write_gray_png(tmp_path / "p.png", np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
    g = np.asarray(Image.open(tmp_path / "p.png"))
    assert g[0, 0] == 0 and g[-1, -1] == 255

    obj = {"iou": np.float32(0.5), "shape": np.array([2, 3]), "n": np.int64(4), "t": torch.tensor([1.5]),
           "bad": float("nan"), 3: {"p": tmp_path}}
    write_json(tmp_path / "s.json", obj)
    assert json.loads((tmp_path / "s.json").read_text()) == {
        "iou": 0.5, "shape": [2, 3], "n": 4, "t": [1.5], "bad": None, "3": {"p": str(tmp_path)}
    }


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]

    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


# ----------------------------------------------------------------------------------------------------- pair folders


def test_load_pairs_from_dir(tmp_path):
    for n in ["a.jpg", "a.png", "b.png", "b_mask.png", "c.webp", "c.png", "notes.txt", ".hidden.png"]:
        (tmp_path / n).write_bytes(b"x")
    pairs = load_pairs_from_dir(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [("a.jpg", "a.png"), ("b.png", "b_mask.png"), ("c.webp", "c.png")]

    (tmp_path / "d.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"support_dir: no mask for d\.jpg \(expected mask d\.png\)"):
        load_pairs_from_dir(tmp_path)
    (tmp_path / "d.jpg").unlink()
    (tmp_path / "e_mask.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"mask\(s\) e_mask\.png .* have no image"):
        load_pairs_from_dir(tmp_path)
    (tmp_path / "e_mask.png").unlink()
    (tmp_path / "a.jpeg").write_bytes(b"x")
    with pytest.raises(InputError, match="would share the mask 'a.png'"):
        load_pairs_from_dir(tmp_path)
    with pytest.raises(InputError, match="is not a directory"):
        load_pairs_from_dir(tmp_path / "nope")
