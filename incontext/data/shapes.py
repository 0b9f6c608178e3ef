"""The shape library of the procedural benchmark: 40 shapes in 7 families, rasterised with OpenCV.

Every shape is a list of polygons in a unit frame (x right, y down, the shape fits the unit disc) with a sign:
``+1`` fills, ``-1`` cuts a hole (rings, crescents). ``rasterise`` places a shape at a centre, radius (pixels)
and rotation and returns a boolean mask; polygons are drawn with 4 bits of sub-pixel precision so small shapes
keep their outline.

Families (count): polygons (9), stars (6), rings (3), crescents (2), smooth random blobs (8, each a fixed
Fourier outline), thin structures (6), objects made of parts (6). The library is fixed data: class definitions
refer to shapes by index, so the order below must not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

Polys = list[tuple[np.ndarray, int]]  # (N, 2) float vertices in the unit frame, sign


def _circle(cx: float = 0.0, cy: float = 0.0, r: float = 1.0, n: int = 40) -> np.ndarray:
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)


def _ngon(n: int, r: float = 1.0, phase: float = -np.pi / 2, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    a = phase + np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([sx * r * np.cos(a), sy * r * np.sin(a)], 1)


def _star(points: int, inner: float) -> np.ndarray:
    a = -np.pi / 2 + np.linspace(0.0, 2 * np.pi, 2 * points, endpoint=False)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _bar(p: tuple[float, float], q: tuple[float, float], width: float) -> np.ndarray:
    """A rectangle of ``width`` around the segment p-q."""
    p_, q_ = np.asarray(p, float), np.asarray(q, float)
    d = q_ - p_
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * width / 2
    return np.stack([p_ + n, q_ + n, q_ - n, p_ - n])


def _blob(seed: int, n: int = 48) -> np.ndarray:
    """A smooth star-convex outline r(theta) = 1 + sum_k a_k cos(k theta + phi_k), k = 2..5."""
    rng = np.random.default_rng([7919, seed])
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += rng.uniform(0.06, 0.32) / (k - 1) ** 0.5 * np.cos(k * a + rng.uniform(0, 2 * np.pi))
    r = r / r.max()
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of the library: ``name``, ``family`` and a builder of its unit-frame polygons."""

    name: str
    family: str
    build: Callable[[], Polys]


def _library() -> list[ShapeSpec]:
    S: list[ShapeSpec] = []

    def add(name: str, family: str, polys: Callable[[], Polys]) -> None:
        S.append(ShapeSpec(name, family, polys))

    # polygons
    add("triangle", "polygon", lambda: [(_ngon(3), 1)])
    add("square", "polygon", lambda: [(_ngon(4, phase=np.pi / 4), 1)])
    add("pentagon", "polygon", lambda: [(_ngon(5), 1)])
    add("hexagon", "polygon", lambda: [(_ngon(6), 1)])
    add("octagon", "polygon", lambda: [(_ngon(8, phase=np.pi / 8), 1)])
    add("disc", "polygon", lambda: [(_circle(), 1)])
    add("ellipse", "polygon", lambda: [(_circle(n=40) * [1.0, 0.55], 1)])
    add("rectangle", "polygon", lambda: [(_rect(-1.0, -0.5, 1.0, 0.5), 1)])
    add("diamond", "polygon", lambda: [(_ngon(4, sx=0.6), 1)])
    # stars
    add("star4", "star", lambda: [(_star(4, 0.42), 1)])
    add("star5", "star", lambda: [(_star(5, 0.45), 1)])
    add("star5_fat", "star", lambda: [(_star(5, 0.7), 1)])
    add("star6", "star", lambda: [(_star(6, 0.5), 1)])
    add("star8", "star", lambda: [(_star(8, 0.6), 1)])
    add("gear12", "star", lambda: [(_star(12, 0.78), 1)])
    # rings
    add("ring", "ring", lambda: [(_circle(), 1), (_circle(r=0.55), -1)])
    add("square_ring", "ring", lambda: [(_ngon(4, phase=np.pi / 4), 1), (_ngon(4, 0.5, np.pi / 4), -1)])
    add("hex_ring", "ring", lambda: [(_ngon(6), 1), (_ngon(6, 0.55), -1)])
    # crescents
    add("crescent", "crescent", lambda: [(_circle(), 1), (_circle(0.45, -0.1, 0.85), -1)])
    add("crescent_thin", "crescent", lambda: [(_circle(), 1), (_circle(0.3, 0.0, 0.9), -1)])
    # smooth random blobs, fixed outlines
    for i in range(8):
        add(f"blob{i}", "blob", (lambda i=i: [(_blob(i), 1)]))
    # thin structures
    add("plus", "thin", lambda: [(_rect(-1, -0.17, 1, 0.17), 1), (_rect(-0.17, -1, 0.17, 1), 1)])
    add("cross_x", "thin", lambda: [(_bar((-0.7, -0.7), (0.7, 0.7), 0.3), 1),
                                    (_bar((-0.7, 0.7), (0.7, -0.7), 0.3), 1)])
    add("letter_l", "thin", lambda: [(_rect(-0.6, -1, -0.25, 1), 1), (_rect(-0.6, 0.65, 0.7, 1), 1)])
    add("letter_t", "thin", lambda: [(_rect(-0.9, -0.9, 0.9, -0.55), 1), (_rect(-0.18, -0.9, 0.18, 1), 1)])
    add("chevron", "thin", lambda: [(_bar((-0.9, -0.5), (0.0, 0.5), 0.34), 1),
                                    (_bar((0.0, 0.5), (0.9, -0.5), 0.34), 1)])
    add("zigzag", "thin", lambda: [(_bar((-1, -0.3), (-0.35, 0.35), 0.3), 1),
                                   (_bar((-0.35, 0.35), (0.3, -0.35), 0.3), 1),
                                   (_bar((0.3, -0.35), (1, 0.3), 0.3), 1)])
    # objects made of parts
    add("dumbbell", "parts", lambda: [(_circle(-0.6, 0, 0.4), 1), (_circle(0.6, 0, 0.4), 1),
                                      (_rect(-0.6, -0.12, 0.6, 0.12), 1)])
    add("snowman", "parts", lambda: [(_circle(0, 0.35, 0.6), 1), (_circle(0, -0.6, 0.38), 1)])
    add("arrow", "parts", lambda: [(_rect(-1, -0.18, 0.2, 0.18), 1),
                                   (np.array([[0.1, -0.6], [1.0, 0.0], [0.1, 0.6]]), 1)])
    add("mushroom", "parts", lambda: [(np.concatenate([_circle(0, 0, 0.95, 40)[20:], [[0.95, 0.0]]]), 1),
                                      (_rect(-0.25, -0.05, 0.25, 0.95), 1)])
    add("flower", "parts", lambda: [(_circle(0, 0, 0.4), 1)] + [
        (_circle(0.62 * np.cos(a), 0.62 * np.sin(a), 0.36), 1)
        for a in np.linspace(0, 2 * np.pi, 5, endpoint=False) - np.pi / 2])
    add("house", "parts", lambda: [(_rect(-0.7, -0.1, 0.7, 0.9), 1),
                                   (np.array([[-0.95, -0.05], [0.0, -0.95], [0.95, -0.05]]), 1)])
    return S


SHAPES: list[ShapeSpec] = _library()
assert len(SHAPES) == 40, len(SHAPES)  # class tables assign shapes in blocks of 40
_POLYS: list[Polys] = [s.build() for s in SHAPES]


def rasterise(
    shape: int, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float,
    aspect: float = 1.0,
) -> np.ndarray:
    """Boolean mask of ``SHAPES[shape]`` on an (H, W) canvas.

    Args:
        shape: index into ``SHAPES``.
        size: (H, W) of the canvas.
        centre: (x, y) in pixels.
        radius: pixels per unit of the shape frame.
        angle: rotation in radians (counter-clockwise on screen).
        aspect: the shape's x axis is scaled by this factor before rotation (mild shape jitter).
    """
    h, w = size
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, s], [-s, c]]) * radius  # y points down, so this turns counter-clockwise on screen
    scale = np.array([aspect, 1.0])
    canvas = np.zeros((h, w), np.uint8)
    for poly, sign in _POLYS[shape]:
        pts = (poly * scale) @ rot.T + np.asarray(centre)
        pts = np.round(pts * 16).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1 if sign > 0 else 0, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)
