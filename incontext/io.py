"""Reading users' images and masks, and writing results atomically.

Everything that touches a user file lives here, so the rest of the package only sees canonical arrays:

* images: ``(H, W, 3) uint8`` RGB, in the orientation the image is *displayed* in (EXIF applied);
* masks: ``(H, W) uint8`` label maps, 0 = background, 1..C = classes (a binary mask is 0/1).

Problems the user can fix raise :class:`incontext.errors.InputError` whose message names the argument (``name``),
the value and the fix. Every writer goes through :func:`atomic_path`, so a failed write never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from incontext.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "read_image",
    "read_mask",
    "check_mask_matches_image",
    "check_nonempty",
    "atomic_path",
    "write_mask_png",
    "write_overlay_png",
    "overlay",
    "write_gray_png",
    "write_json",
    "load_pairs_from_dir",
    "label_palette",
]

DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")

# Anything PIL may raise while parsing or decoding a damaged file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)
_PIL_LIMIT_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------------
# opening files


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return f"'{src}'"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _sniff(data: bytes) -> str:
    """A short human description of what a non-image file seems to contain."""
    head = data[:64]
    if not head:
        return "it is empty"
    if head.lstrip().startswith((b"<!DOCTYPE", b"<html", b"<HTML")):
        return "it looks like an HTML page (a download that failed?)"
    if head.lstrip().startswith(b"<svg") or b"<svg" in data[:512]:
        return "it looks like an SVG (vector) file; rasterise it to PNG first"
    try:
        head.decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return f"its first bytes {head[:8]!r} match no supported format"


@contextlib.contextmanager
def _pil_limit(max_pixels: int) -> Iterator[None]:
    """Let PIL open images up to our own cap (we check the header size ourselves, with a clearer message)."""
    # PIL refuses > 2 * MAX_IMAGE_PIXELS at open time; only raise its limit when the caller's cap needs it.
    current = Image.MAX_IMAGE_PIXELS
    if current is None or max_pixels <= current:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
        return
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = current


def _too_big(name: str, what: str, w: int | None, h: int | None, max_pixels: int, n: int | None = None) -> InputError:
    size = f"{w}x{h} = {w * h:,} pixels" if w and h else f"{n:,} pixels" if n else "too many pixels for PIL"
    return InputError(
        f"{name}: {what} has {size}, above the limit max_pixels={max_pixels:,}; "
        f"downscale it first, or raise max_pixels if you trust the file (very large images can be "
        f"decompression bombs)"
    )


def _decode_error(name: str, what: str, fmt: str | None, e: BaseException) -> InputError:
    msg = str(e) or type(e).__name__
    kind = "truncated (incomplete download or copy?)" if "truncat" in msg.lower() else f"corrupt ({msg})"
    fmt_txt = f" ({fmt})" if fmt else ""
    return InputError(f"{name}: {what}{fmt_txt} is {kind}; re-export or re-download it")


def _open_pil(src: str | Path | bytes, *, name: str, max_pixels: int) -> Image.Image:
    """Open a file or bytes with PIL, check the header size against ``max_pixels``, then decode.

    The returned image is fully loaded (first frame for animations) with EXIF orientation applied.
    """
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        what = f"file '{src}'"
        if not path.exists():
            raise InputError(f"{name}: file '{src}' does not exist; check the path (working dir: {os.getcwd()})")
        if path.is_dir():
            raise InputError(f"{name}: '{src}' is a directory, not an image file; pass a file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{name}: cannot read file '{src}': {e.strerror or e}; check its permissions") from e
    else:
        data = bytes(src)
        what = f"image data ({len(data)} bytes)" if data else "image data"
    if not data:
        raise InputError(f"{name}: {what} is empty (0 bytes); re-export or re-download it")

    with _pil_limit(max_pixels):
        try:
            im = Image.open(_io.BytesIO(data))
        except Image.DecompressionBombError as e:
            # PIL's own header check fired first (above 2x its MAX_IMAGE_PIXELS); report it in our terms.
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_big(name, what, None, None, max_pixels, int(found.group(1)) if found else None) from e
        except UnidentifiedImageError as e:
            raise InputError(
                f"{name}: {what} is not a readable image ({_sniff(data)}); supported formats are "
                f"JPEG, PNG, GIF, WebP, BMP and TIFF"
            ) from e
        except _DECODE_ERRORS as e:
            raise _decode_error(name, what, None, e) from e
        w, h = im.size
        # The cap is checked on the header, before any pixel is decoded.
        if w * h > max_pixels:
            raise _too_big(name, what, w, h, max_pixels)
        if w == 0 or h == 0:
            raise InputError(f"{name}: {what} has size {w}x{h}; it holds no pixels")
        try:
            im.seek(0)  # first frame of GIF / animated WebP / multi-page TIFF
            im.load()
        except _DECODE_ERRORS as e:
            raise _decode_error(name, what, im.format, e) from e
    return _apply_exif(im)


def _apply_exif(im: Image.Image) -> Image.Image:
    """Rotate/flip to the displayed orientation; a broken EXIF block is ignored rather than fatal."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF must not make a viewable image unreadable
        return im
    return out if out is not None else im


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _from_torch(x: Any, *, name: str, kind: str) -> np.ndarray:
    """A torch tensor to numpy, channels last: (C,H,W) -> (H,W,C); (1,C,H,W) batch of one is accepted."""
    t = x.detach().cpu()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        if t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        else:
            raise InputError(
                f"{name}: tensor of shape {tuple(x.shape)} is not CHW with 1, 3 or 4 channels; "
                f"pass a {kind} tensor shaped (C,H,W)"
            )
    elif t.ndim != 2:
        raise InputError(f"{name}: tensor of shape {tuple(x.shape)} is not a {kind}; pass (C,H,W) or (H,W)")
    if t.dtype.is_floating_point:
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------------------------------------------------
# images


def _to_uint8_from_16(a: np.ndarray) -> np.ndarray:
    """16-bit levels to 8-bit: 65535 -> 255 (x / 257, rounded), so full white stays full white."""
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a + 128) // 257).astype(np.uint8)


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = rgb.astype(np.uint32) * alpha.astype(np.uint32)[..., None]
    return ((out + 127) // 255).astype(np.uint8)


def _pil_to_rgb(im: Image.Image, *, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        g = _to_uint8_from_16(np.asarray(im))
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        return _array_to_rgb(np.asarray(im, dtype=np.float32), name=name)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_black(rgba[..., :3], rgba[..., 3])
    if mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(im, dtype=np.uint8)


def _array_to_rgb(a: np.ndarray, *, name: str) -> np.ndarray:
    """numpy HWC / HW to (H,W,3) uint8; floats must lie in [0, 1]."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        hint = " (it looks channels-first: transpose to HWC)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise InputError(
            f"{name}: array of shape {a.shape} is not an image{hint}; pass (H,W,3) RGB, (H,W,4) RGBA or (H,W) grey"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{name}: array of shape {a.shape} holds no pixels")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError(f"{name}: float image contains NaN or inf; fix the array before passing it")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(
                f"{name}: float image has values in [{lo:.3g}, {hi:.3g}], expected [0, 1]; divide by 255 or "
                f"pass uint8"
            )
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = _to_uint8_from_16(a)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        else:
            raise InputError(
                f"{name}: array of dtype {a.dtype} with values in [{a.min()}, {a.max()}] is not an image; "
                f"pass uint8 in [0, 255] or float in [0, 1]"
            )
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        return _composite_on_black(a[..., :3], a[..., 3])
    return a


def read_image(src: Any, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load an image from any common source into a canonical ``(H, W, 3) uint8`` RGB array.

    Args:
        src: a path (str / Path), encoded bytes, a ``PIL.Image``, a numpy array ``(H,W,3)`` / ``(H,W,4)`` /
            ``(H,W)`` (uint8, uint16, bool, or float in [0, 1]), or a torch tensor ``(C,H,W)`` (float in [0, 1] or
            uint8).
        name: how the argument is called in error messages (e.g. ``"query"``, ``"support 2 image"``).
        max_pixels: refuse images with more than this many pixels. For files it is checked on the header, before
            decoding, so a decompression bomb costs nothing.

    Returns:
        ``(H, W, 3) uint8`` RGB, H x W being the size as displayed (EXIF orientation applied).

    Rules: the format is detected from the content, not the file extension; GIF / WebP / TIFF give their first
    frame; alpha (RGBA, LA, palette transparency) is composited on black; grey and palette images are expanded to
    RGB; 16-bit images are scaled so that 65535 -> 255.

    Raises:
        InputError: missing, empty, truncated, corrupt or unsupported files, too many pixels, bad arrays.
    """
    if isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        return _pil_to_rgb(_open_pil(src, name=name, max_pixels=max_pixels), name=name)
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise _too_big(name, "PIL image", w, h, max_pixels)
        try:
            src.load()
        except _DECODE_ERRORS as e:
            raise InputError(f"{name}: PIL image cannot be decoded ({e}); re-export the file") from e
        return _pil_to_rgb(_apply_exif(src), name=name)
    if _is_torch(src):
        arr = _from_torch(src, name=name, kind="image")
    elif isinstance(src, np.ndarray):
        arr = src
    else:
        raise InputError(
            f"{name}: got {type(src).__name__}, expected a file path, bytes, PIL image, numpy array (H,W,3) or "
            f"torch tensor (3,H,W)"
        )
    if arr.ndim >= 2 and arr.shape[0] * arr.shape[1] > max_pixels:
        raise _too_big(name, "array", arr.shape[1], arr.shape[0], max_pixels)
    return np.ascontiguousarray(_array_to_rgb(arr, name=name))


# ----------------------------------------------------------------------------------------------------------------------
# masks


def label_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3) uint8``; label 1 = (128,0,0) (PerSeg's foreground colour).

    Computed with the usual bit-interleaving rule: bit ``j`` of the label goes to bit ``7 - j // 3`` of channel
    ``j % 3``.
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
            if not c:
                break
        pal[label] = (r, g, b)
    return pal


_VOC = label_palette(256)

# An edge artefact (anti-aliasing) is a value/colour whose pixels almost all sit within _EDGE_RADIUS px of two
# different other regions; a real class has an interior.
_EDGE_RADIUS = 2
_EDGE_FRACTION = 0.9
# A colour is a candidate class only if it covers at least this share of the pixels (or _MIN_CLASS_PIXELS).
_MIN_CLASS_FRACTION = 0.0005
_MIN_CLASS_PIXELS = 4
# Colours closer than this (Euclidean, RGB 0-255) to a more frequent class colour are noise of that colour (JPEG).
_MERGE_DISTANCE = 40.0
# More colour groups than this: the "mask" is a photo.
_MAX_COLOURS = 255
# A colour mask must have >= _MIN_FLAT_FRACTION of its pixels within _FLAT_DISTANCE of a class colour or black.
_FLAT_DISTANCE = 16.0
_MIN_FLAT_FRACTION = 0.5
# A class colour this close to a PASCAL VOC colour takes its VOC label.
_VOC_TOLERANCE = 12.0
# Radius for colours that are also numerically a blend of two class colours (JPEG smears edges further).
_BLEND_RADIUS = 8
_BLEND_FRACTION = 0.75
# JPEG shifts chroma: a blend can sit this far (RGB) from the straight segment between its two parents.
_BLEND_DISTANCE = 80.0


def _segment_distance(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance from point ``c`` to the segment [a, b] (RGB)."""
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(c - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


def _near(region: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (chessboard distance) of ``region``."""
    from scipy.ndimage import maximum_filter

    return maximum_filter(region.astype(np.uint8), size=2 * radius + 1).astype(bool)


class _Regions:
    """Accepted regions of a mask, with their dilations cached, for the edge-artefact test."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.regions: list[np.ndarray] = []
        self._near: dict[tuple[int, int], np.ndarray] = {}

    def add(self, key: Any, region: np.ndarray) -> None:
        self.keys.append(key)
        self.regions.append(region)

    def near(self, i: int, radius: int) -> np.ndarray:
        if (i, radius) not in self._near:
            self._near[(i, radius)] = _near(self.regions[i], radius)
        return self._near[(i, radius)]

    def blend_parents(
        self,
        region: np.ndarray,
        allowed=lambda a, b: True,
        radius: int = _EDGE_RADIUS,
        fraction: float = _EDGE_FRACTION,
    ) -> tuple[Any, Any] | None:
        """Two accepted regions such that >= ``fraction`` of ``region`` lies within ``radius`` px of both.

        That is the signature of anti-aliasing / resampling blends; a real class has an interior.
        """
        n = int(region.sum())
        if n == 0 or len(self.keys) < 2:
            return None
        for i in range(len(self.keys)):
            for k in range(i + 1, len(self.keys)):
                if not allowed(self.keys[i], self.keys[k]):
                    continue
                both = self.near(i, radius)[region] & self.near(k, radius)[region]
                if both.sum() >= fraction * n:
                    return self.keys[i], self.keys[k]
        return None

    def on_boundaries(self, region: np.ndarray, radius: int, fraction: float) -> bool:
        """True when >= ``fraction`` of ``region`` lies within ``radius`` px of at least two accepted regions.

        Unlike :meth:`blend_parents` the two regions may differ from pixel to pixel (a blend colour that occurs
        both between class A and background and between class A and class B).
        """
        n = int(region.sum())
        if n == 0 or len(self.keys) < 2:
            return False
        hits = np.zeros(n, dtype=np.int64)
        for i in range(len(self.keys)):
            hits += self.near(i, radius)[region]
        return int((hits >= 2).sum()) >= fraction * n


def _binarise_if_single(labels: np.ndarray) -> np.ndarray:
    """0 and one other value -> 0/1 (a 0/255 or 0/128 or 0/7 mask is binary)."""
    nz = np.unique(labels[labels != 0])
    if nz.size == 1 and nz[0] != 1:
        return (labels != 0).astype(np.uint8)
    return labels


def _grey_mask(a: np.ndarray, *, name: str) -> np.ndarray:
    """Single-channel integer or float values -> label map (see :func:`read_mask` for the rules)."""
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError(f"{name}: float mask contains NaN or inf; fix the array before passing it")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return (a > 0.5).astype(np.uint8)
        if np.all(a == np.round(a)):
            a = a.astype(np.int64)  # integral floats: a label map stored as float
        else:
            raise InputError(
                f"{name}: float mask has values in [{lo:.3g}, {hi:.3g}]; pass probabilities in [0, 1] "
                f"(thresholded at 0.5) or integer labels"
            )
    a = a.astype(np.int64)
    if a.min() < 0:
        raise InputError(f"{name}: mask has negative values (min {a.min()}); labels must be 0 (background) or 1..C")
    values, inverse, counts = np.unique(a.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(a.shape)
    nonzero = values[values != 0]
    if nonzero.size <= 1:
        return (a != 0).astype(np.uint8)
    hi = int(values[-1])
    if hi >= 128 and values.size > 64:
        return (a * 2 > hi).astype(np.uint8)  # a soft / feathered / JPEG-compressed binary mask
    # Label map, minus anti-aliasing: a level lying numerically between two larger regions and only along their
    # common boundary is a blend of them, and is snapped to the nearer of the two.
    regions = _Regions()
    snap = {}
    for idx in np.argsort(-counts, kind="stable"):
        v = int(values[idx])
        region = inverse == idx
        parents = regions.blend_parents(region, allowed=lambda p, q, v=v: min(p, q) < v < max(p, q))
        if parents is None:
            regions.add(v, region)
        else:
            snap[v] = min(parents, key=lambda p: abs(p - v))
    kept = [v for v in regions.keys if v != 0]
    if max(kept) > 255:
        raise InputError(
            f"{name}: mask looks like a label map but has labels up to {max(kept)}; labels must be at most 255 "
            f"(0 = background, 1..C classes)"
        )
    lut = np.array([snap.get(int(v), int(v)) for v in values], dtype=np.int64)
    return lut[inverse].astype(np.uint8)


def _photo_error(name: str, why: str) -> InputError:
    return InputError(
        f"{name}: this does not look like a mask but like a photo ({why}); pass the mask file (black = "
        f"background, one flat colour or label value per class), not the image"
    )


def _colour_mask(rgb: np.ndarray, *, name: str) -> np.ndarray:
    """(H,W,3) uint8 colour mask -> label map: each dominant non-black colour is a class (rules in read_mask)."""
    h, w, _ = rgb.shape
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(h, w)
    rgbs = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=1).astype(np.float64)

    # 1. Group the distinct colours around frequent ones (JPEG / resampling noise), background = black first.
    centres = [np.zeros(3)]
    cluster = np.full(len(colours), -1, dtype=np.int64)
    cluster[np.linalg.norm(rgbs, axis=1) < _MERGE_DISTANCE] = 0
    free = np.flatnonzero(cluster < 0)
    free = free[np.argsort(-counts[free], kind="stable")]  # most frequent first
    rgb32 = rgbs.astype(np.float32)
    while free.size:
        if len(centres) > _MAX_COLOURS:
            raise _photo_error(name, f"it has more than {_MAX_COLOURS} distinct colour groups")
        idx = free[0]
        d2 = ((rgb32[free] - rgb32[idx]) ** 2).sum(axis=1)
        members = d2 < _MERGE_DISTANCE**2
        cluster[free[members]] = len(centres)
        centres.append(rgbs[idx])
        free = free[~members]
    sizes = np.bincount(cluster, weights=counts, minlength=len(centres))
    # Cheap early exit for photos (the final check below is stricter): in a mask most pixels sit on a group centre.
    centre_arr = np.stack(centres)
    flat = float(counts[np.linalg.norm(rgbs - centre_arr[cluster], axis=1) <= _FLAT_DISTANCE].sum()) / (h * w)
    if flat < _MIN_FLAT_FRACTION:
        raise _photo_error(name, f"only {flat:.0%} of its pixels have one of its main colours")
    pixel_cluster = cluster[inverse]

    # 2. Keep the groups that are classes: big enough and not a blend along the boundary of two others.
    min_count = max(_MIN_CLASS_PIXELS, int(_MIN_CLASS_FRACTION * h * w))
    regions = _Regions()
    regions.add(0, pixel_cluster == 0)
    accepted: list[int] = []
    for k in np.argsort(-sizes, kind="stable"):
        k = int(k)
        if k == 0 or sizes[k] < min_count:
            continue
        region = pixel_cluster == k
        if regions.blend_parents(region) is not None:
            continue  # anti-aliasing between two classes (or a class and black)
        # JPEG chroma subsampling smears blends over several pixels: a colour close to the segment between two
        # classes' colours whose pixels stay within _BLEND_RADIUS px of two classes is a blend too.
        c = centres[k]
        keys = regions.keys
        if any(
            _segment_distance(c, centres[p], centres[q]) < _BLEND_DISTANCE
            for i, p in enumerate(keys)
            for q in keys[i + 1 :]
        ) and regions.on_boundaries(region, _BLEND_RADIUS, _BLEND_FRACTION):
            continue
        accepted.append(k)
        regions.add(k, region)
    if not accepted:
        return np.zeros((h, w), dtype=np.uint8)

    # 3. Label ids: VOC colours keep their VOC index; otherwise 1..K in colour order (stable across files).
    class_colours = [centres[k] for k in accepted]
    voc_ids = []
    for c in class_colours:
        d = np.linalg.norm(_VOC[1:].astype(np.float64) - c, axis=1)
        voc_ids.append(int(d.argmin()) + 1 if d.min() <= _VOC_TOLERANCE else None)
    if all(v is not None for v in voc_ids) and len(set(voc_ids)) == len(voc_ids):
        ids = voc_ids
    else:
        # coarse channel levels first, so that JPEG drift ((0,1,252) vs (1,255,0)) cannot swap two classes
        order = sorted(
            range(len(accepted)),
            key=lambda i: (tuple(np.round(class_colours[i] / 64).astype(int)), tuple(class_colours[i])),
        )
        ids = [0] * len(accepted)
        for rank, i in enumerate(order):
            ids[i] = rank + 1
    label_of_cluster = {0: 0, **{k: ids[i] for i, k in enumerate(accepted)}}

    # 4. Every distinct colour: its group's label, or (rejected group) the nearest class colour or black.
    targets = np.concatenate([np.zeros((1, 3)), np.stack(class_colours)], axis=0)
    target_labels = np.array([0] + ids, dtype=np.int64)
    d2 = ((rgbs[:, None, :] - targets[None]) ** 2).sum(axis=2)
    nearest = d2.argmin(axis=1)
    # In a mask (even anti-aliased or JPEG-compressed) most pixels carry one of the class colours or black.
    flat = float(counts[d2.min(axis=1) <= _FLAT_DISTANCE**2].sum()) / (h * w)
    if flat < _MIN_FLAT_FRACTION:
        raise _photo_error(name, f"only {flat:.0%} of its pixels have a class colour or black")
    lut = np.array(
        [label_of_cluster.get(int(cluster[i]), int(target_labels[nearest[i]])) for i in range(len(colours))],
        dtype=np.uint8,
    )
    return lut[inverse]


def _pil_mask(im: Image.Image, *, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode == "P":
        idx = np.asarray(im, dtype=np.uint8)
        pal = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        used = np.unique(idx)
        if pal.shape[0] <= int(used.max()):
            pal = np.concatenate([pal, np.zeros((256 - pal.shape[0], 3), np.uint8)])
        used_cols = pal[used].astype(np.int64)
        if np.all(used_cols[:, 0] == used_cols[:, 1]) and np.all(used_cols[:, 1] == used_cols[:, 2]):
            return _grey_mask(pal[idx][..., 0], name=name)  # a grey ramp stored as palette: use the grey levels
        if tuple(pal[0]) == (0, 0, 0):
            return _binarise_if_single(idx.copy())  # VOC / PerSeg / DAVIS: the index is the label
        return _colour_mask(pal[idx], name=name)  # editor palette in arbitrary order: go by colour
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        return _array_mask(_composite_on_black(rgba[..., :3], rgba[..., 3]), name=name)
    if mode in ("L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _grey_mask(np.asarray(im), name=name)
    return _array_mask(np.asarray(im.convert("RGB")), name=name)


def _array_mask(a: np.ndarray, *, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 4:
        if a.dtype != np.uint8:
            raise InputError(f"{name}: RGBA mask must be uint8, got {a.dtype}; pass (H,W) labels instead")
        a = _composite_on_black(a[..., :3], a[..., 3])
    if a.ndim == 2:
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise InputError(f"{name}: mask of shape {a.shape} holds no pixels")
        return _grey_mask(a, name=name)
    if a.ndim == 3 and a.shape[2] == 3:
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise InputError(f"{name}: mask of shape {a.shape} holds no pixels")
        if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
            return _grey_mask(a[..., 0], name=name)  # a grey mask saved as RGB
        if a.dtype == np.uint16:
            a = _to_uint8_from_16(a)
        elif np.issubdtype(a.dtype, np.floating):
            a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
        elif a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        return _colour_mask(a, name=name)
    hint = " (channels-first? pass (H,W))" if a.ndim == 3 and a.shape[0] in (1, 3) else ""
    raise InputError(f"{name}: array of shape {a.shape} is not a mask{hint}; pass (H,W) labels or (H,W,3) colours")


def read_mask(src: Any, *, name: str = "mask", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load a segmentation mask into a canonical ``(H, W) uint8`` label map (0 = background, 1..C = classes).

    Args:
        src: a path, encoded bytes, a ``PIL.Image``, a numpy array ``(H,W)`` / ``(H,W,1)`` / ``(H,W,3)`` /
            ``(H,W,4)`` or a torch tensor ``(H,W)`` / ``(1,H,W)`` / ``(3,H,W)``.
        name: how the argument is called in error messages (e.g. ``"support 2 mask"``).
        max_pixels: as in :func:`read_image`.

    Returns:
        ``(H, W) uint8`` labels at the mask's displayed size (EXIF orientation applied, like images).

    Rules, applied in this order:

    * **binary**: a mask with 0 and exactly one other value (0/1, 0/255, 0/65535 in 16 bits, 0/128, ...) becomes
      0/1; ``bool`` arrays become 0/1; float arrays in [0, 1] are thresholded at ``> 0.5``.
    * **palette PNGs** (mode ``P``): if index 0 is black (PASCAL VOC, PerSeg whose foreground is index 1 =
      (128,0,0), DAVIS) the palette *index* is the label; if every used palette colour is grey the grey levels are
      used (single-channel rules below); otherwise (an editor's palette in arbitrary order) the colours are used
      (colour rules below).
    * **single channel** (8 or 16 bit, also a grey mask saved as RGB, i.e. R == G == B): integer values are labels
      (0 = background, 1..C; PASCAL's 255 border is kept as 255, see ``ignore_index`` in :mod:`incontext.metrics`).
      Soft / anti-aliased binary masks: if the maximum is >= 128 and there are more than 64 grey levels, the mask
      is thresholded at half its maximum (0/1). Otherwise a level that lies numerically between two larger regions
      and only along their common boundary (>= 90 % of its pixels within 2 px of both) is an anti-aliasing blend and
      is snapped to the nearer of the two levels; so a 0/255 mask with smoothed edges is 0/1, and a 0/1/2 label map
      with smoothed edges keeps exactly its labels.
    * **colour masks** (RGB; RGBA is composited on black first): each *dominant* non-black colour is one class.
      Distinct colours are first grouped around frequent ones (within 40 in RGB distance; near-black joins the
      background), which absorbs JPEG noise. A group is a class if it covers at least 0.05 % of the pixels (and 4
      pixels) and is not a blend: >= 90 % of its pixels within 2 px of two other classes / background, or (for
      JPEG-smeared edges) a colour near the segment between two class colours with >= 75 % of its pixels within
      8 px of two classes. Every pixel is then snapped to its class, or to the nearest class colour or black, so
      anti-aliased edges never create extra classes. Labels: if every class colour is (within 12 of) a PASCAL VOC
      colour (:func:`label_palette`) the VOC index is used, so PerSeg's (128,0,0) is 1; otherwise classes are
      numbered 1..K in colour order. For class ids that must agree across files, use palette PNGs or label maps
      (what :func:`write_mask_png` writes). A photo passed as a mask (more than 255 colour groups, or under half of the
      pixels within 16 of a class colour or black) -> InputError.

    A single class always ends up as label 1 (the binary rule is applied last too).

    Raises:
        InputError: unreadable / empty / truncated files, too many pixels, negative or > 255 labels, bad shapes.
    """
    if isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        out = _pil_mask(_open_pil(src, name=name, max_pixels=max_pixels), name=name)
    elif isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise _too_big(name, "PIL image", w, h, max_pixels)
        out = _pil_mask(_apply_exif(src), name=name)
    elif _is_torch(src):
        out = _array_mask(_from_torch(src, name=name, kind="mask"), name=name)
    elif isinstance(src, np.ndarray):
        if src.ndim >= 2 and src.shape[0] * src.shape[1] > max_pixels:
            raise _too_big(name, "array", src.shape[1], src.shape[0], max_pixels)
        out = _array_mask(src, name=name)
    else:
        raise InputError(
            f"{name}: got {type(src).__name__}, expected a file path, bytes, PIL image, numpy array (H,W) or "
            f"torch tensor (H,W)"
        )
    return np.ascontiguousarray(_binarise_if_single(out).astype(np.uint8, copy=False))


def check_mask_matches_image(
    mask: np.ndarray, image: np.ndarray | tuple[int, int], *, name: str, resize: bool = False
) -> np.ndarray:
    """Check that ``mask`` (H,W) has the size of ``image`` ((H,W,3) array or an (H, W) tuple).

    With ``resize=True`` a mismatching mask is resized with nearest-neighbour (labels are never blended).

    Returns:
        the mask, ``(H, W) uint8`` at the image's size.

    Raises:
        InputError: sizes differ and ``resize`` is False; the message offers ``resize_masks=true``.
    """
    ih, iw = (int(image[0]), int(image[1])) if isinstance(image, tuple) else image.shape[:2]
    mh, mw = mask.shape[:2]
    if (mh, mw) == (ih, iw):
        return mask
    if resize:
        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((iw, ih), Image.NEAREST))
    hint = ""
    if (mh, mw) == (iw, ih):
        hint = " (it is the image's size rotated by 90 degrees: was one of them saved without its EXIF rotation?)"
    raise InputError(
        f"{name}: mask is {mh}x{mw} but image is {ih}x{iw} (HxW){hint}; resize the mask or pass resize_masks=true"
    )


def check_nonempty(mask: np.ndarray, *, name: str, ignore_index: int | None = 255) -> None:
    """Raise if ``mask`` has no foreground pixel (labels other than 0 and ``ignore_index``).

    Raises:
        InputError: the mask is all background; the message says how to fix it.
    """
    fg = mask != 0
    if ignore_index is not None:
        fg &= mask != ignore_index
    if not fg.any():
        h, w = mask.shape[:2]
        raise InputError(
            f"{name}: mask ({h}x{w}) is empty, it has no foreground pixel; mark the object in the mask (non-zero "
            f"pixels), check that you passed the right file, or drop this support"
        )


# ----------------------------------------------------------------------------------------------------------------------
# writers


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (``os.replace``).

    If the block raises, the temporary file is removed and ``path`` is left untouched (no half-written output).
    The parent directory must exist. The temporary name keeps ``path``'s suffix so format-by-extension writers work.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output: directory '{path.parent}' does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _mask_palette(n_labels: int) -> list[int]:
    """Flat 256*3 palette: binary -> 0 black, 1 white; multi-class -> the VOC colour map (255 = VOC's border)."""
    pal = _VOC.copy()
    if n_labels <= 1:
        pal[1] = (255, 255, 255)
    pal[255] = (224, 224, 192)
    return pal.ravel().tolist()


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an ``(H, W)`` label map as a palette PNG at its own size (pixel values = labels).

    Binary masks (labels 0/1) are black/white; multi-class masks use the PASCAL VOC colours (1 = (128,0,0)), so
    :func:`read_mask` reads the labels back unchanged.
    """
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        m = m.astype(np.uint8)
    if m.ndim != 2:
        raise InputError(f"mask: expected (H,W) labels to write, got shape {m.shape}")
    if m.size and (m.min() < 0 or m.max() > 255):
        raise InputError(f"mask: labels must be in [0, 255] to write a PNG, got [{m.min()}, {m.max()}]")
    m = m.astype(np.uint8)
    labels = np.unique(m)
    pimg = Image.frombytes("P", (m.shape[1], m.shape[0]), m.tobytes())
    pimg.putpalette(_mask_palette(int((labels[(labels != 0) & (labels != 255)]).size)))
    with atomic_path(path) as tmp:
        pimg.save(tmp, format="PNG")


def _class_colours(labels: np.ndarray) -> dict[int, tuple[int, int, int]]:
    """Overlay colours: binary foreground is a vivid green; classes use the VOC colours brightened."""
    fg = [int(v) for v in labels if v not in (0, 255)]
    if len(fg) == 1:
        return {fg[0]: (0, 220, 90)}
    out = {}
    for v in fg:
        c = _VOC[v].astype(np.int64)
        c = np.minimum(255, c + 64 if c.max() < 160 else c)  # dark VOC colours are hard to see over photos
        out[v] = tuple(int(x) for x in c)
    return out


def write_overlay_png(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> None:
    """Write ``image`` (H,W,3) uint8 with ``mask`` (H,W) labels tinted over it (``alpha``) and a 2-px contour."""
    out = overlay(image, mask, alpha)
    with atomic_path(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
            colour: tuple[int, int, int] | None = None) -> np.ndarray:
    """``image`` (H,W,3) uint8 with ``mask`` (H,W) labels tinted over it (``alpha``) and a 2-px contour, as
    (H,W,3) uint8 RGB (what ``write_overlay_png`` writes). ``colour`` replaces the binary foreground's green
    (for images whose target is green itself)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"image: overlay needs (H,W,3) uint8, got shape {img.shape} dtype {img.dtype}")
    m = check_mask_matches_image(np.asarray(mask).astype(np.uint8), img, name="overlay")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha: {alpha} is outside [0, 1]; pass e.g. alpha=0.5")
    from scipy.ndimage import binary_erosion

    out = img.astype(np.float32)
    colours = _class_colours(np.unique(m))
    if colour is not None and len(colours) == 1:
        colours = {label: colour for label in colours}
    for label, rgb in colours.items():
        region = m == label
        col = np.asarray(rgb, dtype=np.float32)
        out[region] = (1 - alpha) * out[region] + alpha * col
        edge = region & ~binary_erosion(region, iterations=2, border_value=0)
        out[edge] = col
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_gray_png(path: str | os.PathLike, array01: np.ndarray) -> None:
    """Write an ``(H, W)`` float map in [0, 1] (probability, uncertainty) as an 8-bit grey PNG (1.0 -> 255)."""
    a = np.asarray(array01, dtype=np.float32)
    if a.ndim != 2:
        raise InputError(f"array01: expected (H,W), got shape {a.shape}")
    if a.size and (not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise InputError("array01: values must be finite and in [0, 1]; normalise the map before writing")
    with atomic_path(path) as tmp:
        Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")


def _jsonable(o: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays, torch tensors, Paths, sets, dataclasses converted; NaN/inf -> None."""
    import dataclasses

    if isinstance(o, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) or k is None else k: _jsonable(v)
                for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (set, frozenset)):
        return [_jsonable(v) for v in sorted(o, key=repr)]
    if isinstance(o, bool) or o is None or isinstance(o, (str, int)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None  # JSON has no NaN / Infinity
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if _is_torch(o):
        return _jsonable(o.detach().cpu().tolist())
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return _jsonable(dataclasses.asdict(o))
    raise TypeError(f"write_json: {type(o).__name__} is not JSON serialisable; convert it to a plain value first")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON.

    numpy scalars/arrays, torch tensors, Paths, sets and dataclasses are converted; NaN and inf become ``null``.
    The text is built before the file is opened, so an unserialisable object leaves no file.
    """
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# folders of pairs


def load_pairs_from_dir(directory: str | os.PathLike) -> list[tuple[Path, Path]]:
    """List ``(image_path, mask_path)`` pairs in a folder, sorted by name.

    Naming rule (one level, hidden files ignored):

    * an image ``name.jpg`` (or .jpeg/.gif/.webp/.bmp/.tif/.tiff) has its mask in ``name.png``;
    * an image ``name.png`` has its mask in ``name_mask.png``;
    * files ending in ``_mask.png``, and ``.png`` files that are the mask of a non-PNG image, are masks; every
      other supported file is an image.

    Raises:
        InputError: the folder does not exist or holds no image, an image has no mask, a mask has no image, or two
        images claim the same mask (``a.jpg`` and ``a.jpeg``). The message lists the files and the rule.
    """
    d = Path(directory).expanduser()
    rule = "name.jpg + name.png, or name.png + name_mask.png"
    if not d.is_dir():
        raise InputError(f"support_dir: '{directory}' is not a directory; pass a folder of pairs ({rule})")
    files = sorted(
        p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    names = {p.name for p in files}
    by_stem_nonpng: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() != ".png":
            by_stem_nonpng.setdefault(p.stem, []).append(p)

    def mask_name(img: Path) -> str:
        return f"{img.stem}.png" if img.suffix.lower() != ".png" else f"{img.stem}_mask.png"

    is_mask = {p.name for p in files if p.name.lower().endswith("_mask.png")}
    is_mask |= {p.name for p in files if p.suffix.lower() == ".png" and p.stem in by_stem_nonpng}
    images = [p for p in files if p.name not in is_mask]
    for stem, imgs in by_stem_nonpng.items():
        if len(imgs) > 1:
            raise InputError(
                f"support_dir: {', '.join(i.name for i in imgs)} in '{directory}' would share the mask "
                f"'{stem}.png'; rename one of them"
            )
    if not images:
        raise InputError(f"support_dir: '{directory}' contains no image; expected pairs named {rule}")
    pairs, missing = [], []
    for img in images:
        m = mask_name(img)
        if m in names:
            pairs.append((img, d / m))
        else:
            missing.append(f"{img.name} (expected mask {m})")
    if missing:
        raise InputError(
            f"support_dir: no mask for {', '.join(missing)} in '{directory}'; add the mask or remove the image "
            f"(rule: {rule})"
        )
    used = {m.name for _, m in pairs}
    orphans = sorted(n for n in is_mask if n not in used)
    if orphans:
        raise InputError(
            f"support_dir: mask(s) {', '.join(orphans)} in '{directory}' have no image (rule: {rule}); add the "
            f"image or remove the mask"
        )
    return pairs
