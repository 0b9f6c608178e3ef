"""A second procedural few-shot set, drawn by a different generator than the training data, written as a folder set.

Purpose: a held-out check that a model trained on ``synthetic.py`` scenes did not just learn that generator. The
shape laws, textures and backgrounds below are deliberately ones ``shapes.py`` / ``textures.py`` never draw:

* **Shapes** (5 families, one fixed shape per class): letters and digits rendered with OpenCV's Hershey fonts,
  superellipses ``|x|^n + |y/b|^n <= 1`` (astroids to squircles), gears (rectangular teeth), hearts / cardioids,
  and thick Archimedean spirals.
* **Textures** (7 kinds, evaluated in the object's frame so they turn with it): multi-octave value noise (fBm)
  between two colours, plaid (two crossed sinusoids, three colours), camouflage (thresholded noise, three
  colours), spiral stripes, hexagonal dot lattices, speckle on a base colour, and hue gradients.
* **Backgrounds** are photo-like rather than mosaics: a vertical two-colour gradient with a soft horizon, blurred
  low-frequency noise and a few defocused "bokeh" discs; objects cast a soft drop shadow; the final image gets
  mild blur, sensor noise and JPEG compression.
* **Distractors**: every image also holds 1-3 instances of *other classes of the set*, preferring classes with
  the same texture kind or shape family, so only the combination shown in the supports identifies the target.

A class = (shape, texture kind + parameters, palette); each instance jitters scale, rotation, aspect and colours.
Masks are the target's visible pixels (0/1, saved 0/255) after occlusion by later objects. Everything is a
function of ``seed``: the same seed writes byte-identical PNG masks (JPEG encoders may differ across OpenCV
builds). Layout: ``<root>/<class>/<NN>.jpg + <NN>.png``, as ``incontext.data.folder.FolderBenchmark`` reads it.

    python benchmarks/make_folder_set.py --root outputs/folder_alt --classes 40 --images 10 --seed 0
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from incontext.errors import InputError

FAMILIES = ("glyph", "superellipse", "gear", "heart", "spiral")
TEXTURES = ("fbm", "plaid", "camo", "spiral_stripes", "hex_dots", "speckle", "hue_gradient")
_GLYPHS = "AKRGMWQ5823ZXEH&%?"
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)
_TEMPLATE = 128  # shape templates are drawn once per class at this size, unit frame [-1, 1]^2


@dataclass(frozen=True)
class AltClass:
    """One class of the set: a shape template, a texture and its palette."""

    name: str
    family: str
    texture: str
    template: np.ndarray  # (_TEMPLATE, _TEMPLATE) bool in the unit frame
    params: tuple[float, ...]  # texture parameters (frequency, angle, ...)
    colours: np.ndarray  # (3, 3) float RGB in [0, 255]


# ------------------------------------------------------------------ shapes (unit frame, y down)
def _unit_grid(n: int = _TEMPLATE) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(n) + 0.5) / n * 2 - 1
    return np.meshgrid(t, t)


def _shape_template(family: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    x, y = _unit_grid()
    r, a = np.hypot(x, y), np.arctan2(y, x)
    if family == "glyph":
        ch = str(rng.choice(list(_GLYPHS)))
        font = int(rng.choice(_FONTS))
        img = np.zeros((_TEMPLATE, _TEMPLATE), np.uint8)
        thick = int(rng.integers(9, 16))
        (w, h), base = cv2.getTextSize(ch, font, 1.0, thick)
        scale = 0.85 * _TEMPLATE / max(w, h + base)
        (w, h), base = cv2.getTextSize(ch, font, scale, thick)
        org = ((_TEMPLATE - w) // 2, (_TEMPLATE + h) // 2)
        cv2.putText(img, ch, org, font, scale, 255, thick, cv2.LINE_AA)
        return img > 127, f"glyph-{ch if ch.isalnum() else hex(ord(ch))[2:]}"
    if family == "superellipse":
        n = float(rng.choice([0.55, 0.8, 1.0, 2.6, 4.0]))
        b = float(rng.uniform(0.55, 0.9))
        m = np.abs(x / 0.92) ** n + np.abs(y / (0.92 * b)) ** n <= 1
        return m, f"superellipse-n{n:g}"
    if family == "gear":
        teeth = int(rng.integers(5, 12))
        depth = float(rng.uniform(0.15, 0.3))
        hole = float(rng.uniform(0.0, 0.3))
        tooth = (np.cos(teeth * a) > 0).astype(float)
        m = (r <= 0.92 - depth + depth * tooth) & (r >= hole)
        return m, f"gear-{teeth}"
    if family == "heart":
        k = float(rng.uniform(0.0, 1.0))  # 0 = cardioid, 1 = heart
        # heart implicit (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 (y up), blended with a cardioid r <= 1 - sin(a)
        hx, hy = x * 1.25, -y * 1.25 + 0.15
        heart = (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
        card = r <= 0.46 * (1 - np.sin(a + np.pi))
        m = heart if k > 0.5 else card
        return m, "heart" if k > 0.5 else "cardioid"
    if family == "spiral":
        turns = float(rng.uniform(1.6, 2.6))
        width = float(rng.uniform(0.22, 0.32))
        # Archimedean spiral r = c * theta; a pixel is on the stroke when its radius is near one of the arms
        c = 0.9 / (2 * np.pi * turns)
        theta = np.mod(a, 2 * np.pi)
        k = np.round((r / c - theta) / (2 * np.pi))
        arm = c * (theta + 2 * np.pi * np.clip(k, 0, np.floor(turns)))
        m = (np.abs(r - arm) <= width * 2 * np.pi * c / 2) & (r <= 0.92) & (r / c >= 0.3)
        return m | (r <= 0.12), f"spiral-{turns:.1f}"
    raise InputError(f"family: unknown {family!r}; one of {', '.join(FAMILIES)}")


# ------------------------------------------------------------------ textures (object frame u, v in radii)
def _value_noise(u: np.ndarray, v: np.ndarray, seed: int, freq: float, octaves: int = 3) -> np.ndarray:
    """Smooth noise in [0, 1] at coordinates (u, v): bilinear interpolation of a seeded lattice, summed octaves."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(u)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        f = freq * 2**o
        lattice = rng.random((64, 64))
        gu, gv = (u * f) % 63, (v * f) % 63
        i0, j0 = np.floor(gu).astype(int), np.floor(gv).astype(int)
        fu, fv = gu - i0, gv - j0
        fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
        a = lattice[j0, i0] * (1 - fu) + lattice[j0, i0 + 1] * fu
        b = lattice[j0 + 1, i0] * (1 - fu) + lattice[j0 + 1, i0 + 1] * fu
        out += amp * (a * (1 - fv) + b * fv)
        total += amp
        amp *= 0.5
    return out / total


def _texture(cls: AltClass, u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """RGB float (…, 3) of class ``cls`` at object-frame coordinates (u, v)."""
    c = cls.colours
    f, ang, extra = cls.params
    ca, sa = np.cos(ang), np.sin(ang)
    ru, rv = u * ca - v * sa, u * sa + v * ca
    if cls.texture == "fbm":
        t = _value_noise(ru, rv, seed, f)
        t = np.clip((t - 0.5) * 2.5 + 0.5, 0, 1)[..., None]
        return (1 - t) * c[0] + t * c[1]
    if cls.texture == "plaid":
        s1 = 0.5 + 0.5 * np.sin(2 * np.pi * f * ru)
        s2 = 0.5 + 0.5 * np.sin(2 * np.pi * f * extra * rv)
        return c[0] * (1 - s1[..., None]) * (1 - s2[..., None]) + c[1] * s1[..., None] + c[2] * s2[..., None] * (1 - s1[..., None])
    if cls.texture == "camo":
        t = _value_noise(ru, rv, seed, f, octaves=2)
        idx = np.digitize(t, [0.42, 0.58])
        return c[idx]
    if cls.texture == "spiral_stripes":
        rr, aa = np.hypot(u, v), np.arctan2(v, u)
        t = 0.5 + 0.5 * np.sin(round(extra) * aa + 2 * np.pi * f * rr)
        t = (t > 0.5).astype(float)[..., None]
        return (1 - t) * c[0] + t * c[1]
    if cls.texture == "hex_dots":
        k = 2 * np.pi * f
        s = sum(np.cos(k * (ru * np.cos(th) + rv * np.sin(th))) for th in (0, 2 * np.pi / 3, 4 * np.pi / 3))
        t = (s > extra).astype(float)[..., None]  # s in [-1.5, 3]; a high threshold gives dots
        return (1 - t) * c[0] + t * c[1]
    if cls.texture == "speckle":
        rng = np.random.default_rng(seed)
        t = (rng.random(u.shape) < extra * 0.5).astype(float)[..., None]
        return (1 - t) * c[0] + t * c[1]
    if cls.texture == "hue_gradient":
        t = np.clip(0.5 + 0.5 * ru / 1.0, 0, 1)[..., None]
        mid = np.clip(1 - np.abs(2 * t - 1), 0, 1)
        return (1 - t) * c[0] * (1 - mid) + t * c[1] * (1 - mid) + mid * c[2]
    raise InputError(f"texture: unknown {cls.texture!r}; one of {', '.join(TEXTURES)}")


def _palette(rng: np.random.Generator) -> np.ndarray:
    """Three well-separated saturated colours (RGB floats)."""
    h0 = rng.uniform(0, 180)
    hues = (h0 + np.array([0, rng.uniform(50, 80), rng.uniform(100, 140)])) % 180
    sat = rng.uniform(120, 255, 3)
    val = rng.uniform(90, 250, 3)
    hsv = np.stack([hues, sat, val], 1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def make_classes(n: int, seed: int = 0) -> list[AltClass]:
    """The ``n`` classes of the set (families and texture kinds dealt round-robin so each recurs)."""
    if n < 2:
        raise InputError(f"classes: {n}; a few-shot set needs at least 2 classes (distractors come from others)")
    rng = np.random.default_rng([seed, 7])
    out, names = [], set()
    for i in range(n):
        fam = FAMILIES[i % len(FAMILIES)]
        tex = TEXTURES[(i * 3 + i // len(FAMILIES)) % len(TEXTURES)]
        template, sname = _shape_template(fam, rng)
        f = float(rng.uniform(1.2, 3.5))
        ang = float(rng.uniform(0, np.pi))
        extra = {"plaid": rng.uniform(0.5, 2.0), "spiral_stripes": rng.integers(2, 6),
                 "hex_dots": rng.uniform(0.8, 1.8), "speckle": rng.uniform(0.3, 0.8)}.get(tex, 0.0)
        name = f"{i:02d}_{sname}_{tex}"
        assert name not in names
        names.add(name)
        out.append(AltClass(name, fam, tex, template, (f, ang, float(extra)), _palette(rng)))
    return out


# ------------------------------------------------------------------ scenes
def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    top, bottom = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    horizon = rng.uniform(0.3, 0.7) * h
    soft = rng.uniform(0.05, 0.3) * h
    t = 1 / (1 + np.exp(-(np.arange(h) - horizon) / soft))
    img = top[None, None] * (1 - t[:, None, None]) + bottom[None, None] * t[:, None, None]
    img = np.broadcast_to(img, (h, w, 3)).copy()
    small = rng.normal(0, 1, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3)).astype(np.float32)
    img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(8, 25)
    for _ in range(int(rng.integers(2, 6))):  # defocused discs
        disc = np.zeros((h, w), np.float32)
        cv2.circle(disc, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(0.05, 0.2) * min(h, w)),
                   1.0, -1, cv2.LINE_AA)
        disc = cv2.GaussianBlur(disc, (0, 0), rng.uniform(3, 8))[..., None]
        img = img * (1 - 0.5 * disc) + rng.uniform(0, 255, 3) * 0.5 * disc
    return img


def _place(cls: AltClass, h: int, w: int, rng: np.random.Generator, radius: float, seed: int):
    """One instance: its mask (H, W) bool and colours (H, W, 3) float (valid inside the mask)."""
    cx, cy = rng.uniform(radius * 0.7, w - radius * 0.7), rng.uniform(radius * 0.7, h - radius * 0.7)
    rot = rng.uniform(-np.pi / 4, np.pi / 4)
    sx = radius * rng.uniform(0.85, 1.15)
    sy = radius * rng.uniform(0.85, 1.15)
    # affine from the unit frame to the image: p = R @ diag(sx, sy) @ u + c
    cr, sr = np.cos(rot), np.sin(rot)
    A = np.array([[cr * sx, -sr * sy], [sr * sx, cr * sy]])
    # template pixel (i + 0.5) / T * 2 - 1 = u  ->  u = i * 2 / T + (1 / T - 1)
    s, o = 2.0 / _TEMPLATE, 1.0 / _TEMPLATE - 1.0
    M = np.concatenate([A * s, (A @ np.array([o, o]) + np.array([cx, cy]))[:, None]], 1)
    mask = cv2.warpAffine(cls.template.astype(np.uint8) * 255, M, (w, h), flags=cv2.INTER_LINEAR) > 127
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask, None
    inv = np.linalg.inv(A)
    pu = inv @ np.stack([xs - cx, ys - cy])
    jit = cls.colours * rng.uniform(0.85, 1.15, (1, 3)) + rng.normal(0, 8, (1, 3))
    local = AltClass(cls.name, cls.family, cls.texture, cls.template, cls.params, np.clip(jit, 0, 255))
    rgb = np.zeros((h, w, 3), np.float32)
    col = _texture(local, pu[0], pu[1], seed)
    shade = 1 + 0.15 * (pu[0] * rng.uniform(-1, 1) + pu[1] * rng.uniform(-1, 1))  # soft directional lighting
    rgb[ys, xs] = col * shade[:, None]
    return mask, rgb


def render_image(classes: list[AltClass], target: int, seed: int, *, size: tuple[int, int] = (160, 224),
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``target``: (H, W, 3) uint8 RGB and (H, W) uint8 0/1 mask of its visible pixels."""
    rng = np.random.default_rng(seed)
    lo, hi = size
    for _ in range(20):
        h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        img = _background(h, w, rng)
        tcls = classes[target]
        same = [i for i, c in enumerate(classes) if i != target
                and (c.texture == tcls.texture or c.family == tcls.family)]
        others = [i for i in range(len(classes)) if i != target]
        n_t = 1 + int(rng.random() < 0.3)
        n_d = int(rng.integers(1, 4))
        objs = [target] * n_t + [int(rng.choice(same if same and rng.random() < 0.6 else others)) for _ in range(n_d)]
        rng.shuffle(objs)  # random depth order
        labels = np.zeros((h, w), np.int16) - 1
        shadow = np.zeros((h, w), np.float32)
        for k, ci in enumerate(objs):
            radius = rng.uniform(0.14, 0.26) * min(h, w)
            m, rgb = _place(classes[ci], h, w, rng, radius, seed * 31 + k)
            if rgb is None:
                continue
            sh = np.roll(m.astype(np.float32), (int(radius * 0.12), int(radius * 0.12)), (0, 1))
            shadow = np.maximum(shadow, cv2.GaussianBlur(sh, (0, 0), radius * 0.08 + 1) * 0.45)
            img = img * (1 - shadow[..., None])
            shadow[:] = 0
            img[m] = rgb[m]
            labels[m] = ci if ci != target else 10_000
        gt = (labels == 10_000)
        # require every target pixel set to be a reasonably visible object
        if gt.sum() >= 0.01 * h * w:
            break
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.3, 0.9))
    img += rng.normal(0, rng.uniform(1, 5), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), gt.astype(np.uint8)


def write_set(root: str | os.PathLike, classes: int = 40, images: int = 10, seed: int = 0,
              size: tuple[int, int] = (160, 224), quality: int = 90) -> Path:
    """Write the set to ``root`` (``<root>/<class>/<NN>.jpg + <NN>.png``, masks 0/255); returns the root.

    Each class folder is written to a temporary name and renamed when complete, so an interrupted run leaves
    no half-written class that the folder loader would read. Class folders already there are rewritten.
    """
    if images < 2:
        raise InputError(f"images: {images}; each class needs at least 2 images (a support and a query)")
    lo, hi = size
    if not 16 <= lo <= hi:
        raise InputError(f"size: {size}; pass (min_side, max_side) with 16 <= min_side <= max_side")
    out = Path(root).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    table = make_classes(classes, seed)
    names = {c.name for c in table}
    stale = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in names)
    if stale:
        raise InputError(f"root: '{out}' holds class folders this set would not write ({', '.join(stale[:3])}...); "
                         "pass an empty or new folder (the loader would read them as classes)")
    for ci, cls in enumerate(table):
        final = out / cls.name
        tmp = out / f".{cls.name}.tmp"
        tmp.mkdir(exist_ok=True)
        for j in range(images):
            img, mask = render_image(table, ci, seed=int(np.random.SeedSequence([seed, ci, j]).generate_state(1)[0]),
                                     size=size)
            cv2.imwrite(str(tmp / f"{j:02d}.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            cv2.imwrite(str(tmp / f"{j:02d}.png"), mask * 255)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return out
