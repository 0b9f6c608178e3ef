"""Textures and colour schemes of the procedural benchmark.

A texture is a pattern ``t(u, v) in [0, 1]`` evaluated in an object's own frame (units of its radius, so the
texture turns and scales with the object), mixed between the two colours of a colour scheme:
``rgb = (1 - t) * c1 + t * c2``, then lit by a mild linear shading.

Class patterns are a fixed list of 20 (``PATTERNS``: stripes at 4 angles x 2 periods, checks, dots, wavy noise,
gradients, concentric rings, solid); class colour schemes are 12 pairs (``SCHEMES``). Background regions and
clutter draw their pattern parameters from the same families with continuous random parameters and their
colours from the same palette, so no texture or colour statistic tells objects from background.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("stripes", "checks", "dots", "noise", "gradient", "rings", "solid")


@dataclass(frozen=True)
class Pattern:
    """A pattern family and its parameters.

    Attributes:
        kind: one of ``KINDS``.
        angle: orientation in radians (stripes, checks, dots, gradient, noise base angle).
        period: wavelength in units of the object radius (stripes, checks, dots, noise, rings).
        width: dot radius as a fraction of the period (dots), or edge sharpness (others).
        phases: per-instance random phases of the wavy-noise components (set at render time).
    """

    kind: str
    angle: float = 0.0
    period: float = 0.5
    width: float = 0.3
    phases: tuple[float, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        if self.kind in ("solid",):
            return self.kind
        if self.kind in ("rings",):
            return f"{self.kind}{self.period:.2f}"
        return f"{self.kind}{round(np.degrees(self.angle)):d}-{self.period:.2f}"


_D = np.pi / 180
PATTERNS: list[Pattern] = (
    [Pattern("stripes", a * _D, p) for p in (0.32, 0.6) for a in (0, 45, 90, 135)]
    + [Pattern("checks", a * _D, p) for p in (0.45, 0.8) for a in (0, 45)]
    + [Pattern("dots", 0.0, 0.42, 0.28), Pattern("dots", 45 * _D, 0.7, 0.3)]
    + [Pattern("noise", 0.0, 0.35), Pattern("noise", 0.0, 0.9)]
    + [Pattern("gradient", 0.0, 1.0), Pattern("gradient", 90 * _D, 1.0)]
    + [Pattern("rings", 0.0, 0.5)]
    + [Pattern("solid")]
)
assert len(PATTERNS) == 20, len(PATTERNS)  # class tables assume 20 patterns x 12 schemes

# A palette of 14 named colours (sRGB); schemes pair a body colour with a pattern colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (235, 215, 60), "lime": (150, 210, 60),
    "green": (40, 140, 60), "teal": (30, 140, 140), "cyan": (90, 200, 225), "blue": (40, 70, 190),
    "purple": (120, 60, 170), "pink": (230, 130, 180), "brown": (120, 80, 45), "cream": (235, 225, 195),
    "grey": (128, 128, 128), "black": (30, 30, 35),
}
SCHEMES: list[tuple[str, str]] = [
    ("red", "yellow"), ("blue", "cream"), ("green", "brown"), ("purple", "cyan"), ("black", "orange"),
    ("teal", "pink"), ("grey", "red"), ("blue", "lime"), ("pink", "green"), ("brown", "cream"),
    ("yellow", "purple"), ("cyan", "black"),
]


def scheme_colours(index: int) -> np.ndarray:
    """(2, 3) float32 RGB of colour scheme ``index``."""
    a, b = SCHEMES[index]
    return np.array([PALETTE[a], PALETTE[b]], np.float32)


def random_pattern(rng: np.random.Generator) -> Pattern:
    """A pattern with continuous random parameters over the class patterns' ranges (background, clutter)."""
    kind = KINDS[int(rng.choice(len(KINDS), p=[0.3, 0.12, 0.12, 0.12, 0.12, 0.12, 0.1]))]
    return Pattern(kind, float(rng.uniform(0, np.pi)), float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.22, 0.34)))


def random_colours(rng: np.random.Generator) -> np.ndarray:
    """(2, 3) float32: two different palette colours, each perturbed (background, clutter)."""
    names = list(PALETTE)
    i, j = rng.choice(len(names), 2, replace=False)
    cols = np.array([PALETTE[names[i]], PALETTE[names[j]]], np.float32)
    return np.clip(cols + rng.normal(0, 12, (2, 3)), 0, 255).astype(np.float32)


def jitter_pattern(p: Pattern, rng: np.random.Generator) -> Pattern:
    """Mild instance jitter: period x U(0.9, 1.1), angle +- 6 degrees, fresh noise phases."""
    phases = tuple(float(x) for x in rng.uniform(0, 2 * np.pi, 6))
    return replace(p, period=p.period * float(rng.uniform(0.9, 1.1)),
                   angle=p.angle + float(rng.uniform(-6, 6)) * _D, phases=phases)


def jitter_colours(cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild instance colour jitter: per-channel offset N(0, 7) and brightness x U(0.88, 1.12)."""
    return np.clip((cols + rng.normal(0, 7, cols.shape)) * rng.uniform(0.88, 1.12), 0, 255).astype(np.float32)


def _soft(x: np.ndarray, sharpness: float = 4.0) -> np.ndarray:
    """Map a [-1, 1] wave to [0, 1] with crisp but anti-aliased edges."""
    return np.clip(0.5 + sharpness * 0.5 * x, 0.0, 1.0)


def pattern_values(p: Pattern, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Evaluate pattern ``p`` at object-frame coordinates (u, v) (any shape); returns float32 in [0, 1]."""
    ca, sa = np.cos(p.angle), np.sin(p.angle)
    a = u * ca + v * sa
    b = -u * sa + v * ca
    k = 2 * np.pi / p.period
    if p.kind == "stripes":
        t = _soft(np.sin(k * a))
    elif p.kind == "checks":
        t = _soft(np.sin(k * a) * np.sin(k * b) * 2.0)
    elif p.kind == "dots":
        fa = a / p.period - np.floor(a / p.period) - 0.5
        fb = b / p.period - np.floor(b / p.period) - 0.5
        d = np.sqrt(fa * fa + fb * fb)
        t = np.clip((p.width - d) * 12.0 + 0.5, 0.0, 1.0)
    elif p.kind == "noise":
        ph = p.phases or (0.3, 1.7, 2.9, 4.1, 0.9, 5.3)
        t = np.zeros_like(a)
        for i in range(3):
            ang = p.angle + ph[i]
            t = t + np.sin(k * (u * np.cos(ang) + v * np.sin(ang)) + ph[3 + i])
        t = _soft(t / 1.7, 2.0)
    elif p.kind == "gradient":
        t = np.clip(0.5 + 0.5 * a, 0.0, 1.0)
    elif p.kind == "rings":
        t = _soft(np.sin(k * np.sqrt(u * u + v * v)))
    elif p.kind == "solid":
        t = np.zeros_like(a)
    else:
        raise ValueError(f"pattern kind {p.kind!r}; expected one of {KINDS}")
    return t.astype(np.float32, copy=False)


def paint(
    p: Pattern, cols: np.ndarray, u: np.ndarray, v: np.ndarray, light: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """RGB float32 (..., 3) of pattern ``p`` in colours ``cols`` (2, 3) at object coordinates (u, v), with a
    linear shading ``1 + light[0] * u + light[1] * v``."""
    t = pattern_values(p, u, v)[..., None]
    rgb = cols[0] * (1.0 - t) + cols[1] * t
    if light != (0.0, 0.0):
        rgb = rgb * (1.0 + light[0] * u + light[1] * v)[..., None]
    return rgb
