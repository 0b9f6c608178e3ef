"""Canvas building and mask colour coding for grid-inpainting generators (Painter / SegGPT).

Pure functions on numpy arrays and tensors; no model here.

Frames and value ranges:

* a *cell* is one half of the two-stream canvas, (h, w) = (canvas_h / 2, canvas_w) — 448 x 448 for the released
  SegGPT. Every image or mask is resized to the cell **ignoring aspect ratio** (images bicubic, masks nearest),
  as SegGPT's processor does.
* *model space*: (3, h, w) float tensors normalised with the ImageNet mean/std — for images *and* for the RGB
  colour-coded masks (SegGPT's input contract, reference note section 9.3).
* *colour space*: float RGB in [0, 1] (``denormalise`` maps the model's output back here).
* a *palette* is a (C + 1, 3) uint8 array; row 0 is the background colour, row c the colour of class c.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "binary_palette",
    "painter_palette",
    "random_palette",
    "encode_mask",
    "grey_image",
    "resize_image",
    "resize_labels",
    "to_model",
    "denormalise",
    "grid_side",
    "tile",
    "untile_mean",
    "nearest_colour",
    "binary_score",
    "palette_scores",
]

# ImageNet statistics used by SegGPT's image processor for images and colour-coded masks alike.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ palettes
def binary_palette() -> np.ndarray:
    """(2, 3) uint8: black background, white foreground (SegGPT's binary prompt colours)."""
    return np.array([[0, 0, 0], [255, 255, 255]], np.uint8)


def painter_palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 palette of Painter / HF ``build_palette``: class 0 black, class l >= 1 gets
    (255 - r·m, 255 - g·m, 255 - b·m) with base b = floor(n^(1/3)) + 1, m = 256 // b and (r, g, b) the base-b
    digits of l - 1. num_classes = 1 gives [black, white]."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    base = int(num_classes ** (1 / 3)) + 1
    margin = 256 // base
    rows = [(0, 0, 0)]
    for loc in range(num_classes):
        r, g, b = loc // base**2, (loc % base**2) // base, loc % base
        rows.append((255 - r * margin, 255 - g * margin, 255 - b * margin))
    return np.array(rows, np.uint8)


def random_palette(
    num_classes: int,
    rng: np.random.Generator,
    min_distance: float = 96.0,
    random_background: bool = False,
) -> np.ndarray:
    """SegGPT's "in-context colouring": a fresh random colour per class for one training sample.

    Args:
        num_classes: foreground classes C.
        rng: numpy generator (the caller seeds it per sample, so samples do not depend on worker count).
        min_distance: minimum L2 distance (0..255 units) between any two colours, so classes stay separable;
            relaxed automatically if many classes make it infeasible.
        random_background: also draw the background colour (otherwise black).

    Returns:
        (C + 1, 3) uint8, row 0 = background.
    """
    colours = [rng.integers(0, 256, 3).astype(np.float64) if random_background else np.zeros(3)]
    dist = float(min_distance)
    tries = 0
    while len(colours) < num_classes + 1:
        c = rng.integers(0, 256, 3).astype(np.float64)
        if all(np.linalg.norm(c - o) >= dist for o in colours):
            colours.append(c)
        tries += 1
        if tries % 200 == 0:  # crowded colour cube: accept closer colours rather than loop forever
            dist *= 0.8
    return np.stack(colours).astype(np.uint8)


def encode_mask(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) integer label map -> (H, W, 3) uint8 colour image via ``palette[labels]``.

    Labels outside the palette raise (a silent wrap would paint the wrong class)."""
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"label {int(labels.max())} has no colour in a palette of {len(palette)} rows")
    return palette[labels.astype(np.intp)]


def grey_image(prob: np.ndarray | torch.Tensor) -> np.ndarray:
    """(h, w) probability in [0, 1] -> (h, w, 3) uint8 grey image: a soft mask between the binary palette's
    black (0) and white (1), so it can be resized, tiled and normalised like any image."""
    p = prob.detach().float().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob, np.float32)
    g = np.clip(np.round(p * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------------------ resizing
def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bicubic, aspect ratio ignored (SegGPT's processor)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) label map -> (h, w), nearest neighbour (labels must never blend)."""
    h, w = size
    if labels.shape[:2] == (h, w):
        return labels
    return cv2.resize(labels.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)


def to_model(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 RGB -> (..., 3, H, W) float32 in model space (ImageNet-normalised)."""
    x = torch.as_tensor(np.ascontiguousarray(rgb) if isinstance(rgb, np.ndarray) else rgb)
    x = x.movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) model space -> colour space RGB in [0, 1] (clipped), as SegGPT's post-processing."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------ spatial ensemble
def grid_side(k: int) -> int:
    """Side n of the n x n grid holding k tiles (SegGPT's spatial ensemble)."""
    return max(1, math.ceil(math.sqrt(k)))


def tile(items: list[np.ndarray], size: tuple[int, int], is_mask: bool) -> np.ndarray:
    """Tile k images (H_i, W_i, 3) or label maps (H_i, W_i) row-major into an n x n grid of one cell ``size``.

    Empty grid slots repeat the items cyclically, so every slot holds a real example. Each item is resized to
    its tile (aspect ignored); the last row/column absorbs the rounding remainder.
    """
    h, w = size
    n = grid_side(len(items))
    ys = np.linspace(0, h, n + 1).round().astype(int)
    xs = np.linspace(0, w, n + 1).round().astype(int)
    out = np.zeros((h, w) if is_mask else (h, w, 3), np.uint8)
    for slot in range(n * n):
        r, c = divmod(slot, n)
        th, tw = ys[r + 1] - ys[r], xs[c + 1] - xs[c]
        item = items[slot % len(items)]
        out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = (
            resize_labels(item, (th, tw)) if is_mask else resize_image(item, (th, tw))
        )
    return out


def untile_mean(cell: torch.Tensor, n: int) -> torch.Tensor:
    """Average the n x n tiles of a (3, h, w) painted cell into one (3, th, tw) map (th = h // n).

    Tiles are resampled to a common size (bilinear) first because rounding may make them differ by a pixel."""
    h, w = cell.shape[-2:]
    ys = np.linspace(0, h, n + 1).round().astype(int)
    xs = np.linspace(0, w, n + 1).round().astype(int)
    th, tw = max(1, h // n), max(1, w // n)
    acc = torch.zeros(cell.shape[0], th, tw, dtype=cell.dtype, device=cell.device)
    for r in range(n):
        for c in range(n):
            t = cell[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
            if t.shape[-2:] != (th, tw):
                t = F.interpolate(t[None], size=(th, tw), mode="bilinear", align_corners=False)[0]
            acc += t
    return acc / (n * n)


# ------------------------------------------------------------------------------------------ decoding
def _resize_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(rgb.shape[-2:]) == tuple(size):
        return rgb
    return F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False)[0]


def nearest_colour(rgb: torch.Tensor, palette: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Painted colours -> label map: bilinear resize of the RGB to ``size``, then the nearest palette colour
    (squared L2), as Painter's semantic decoding (the bilinear resize avoids blocky nearest upsampling).

    Args:
        rgb: (3, h, w) colour space in [0, 1].
        palette: (C + 1, 3) uint8.
        size: output (H, W), usually the query's original size.

    Returns:
        (H, W) int64 label map, 0 = background.
    """
    return _palette_distances(_resize_rgb(rgb, size), palette).argmin(0)


def _palette_distances(rgb: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    pal = torch.as_tensor(palette, dtype=rgb.dtype, device=rgb.device) / 255.0  # (C+1, 3)
    return ((rgb[None] - pal[:, :, None, None]) ** 2).sum(1)  # (C+1, H, W)


def binary_score(rgb: torch.Tensor, background: np.ndarray, foreground: np.ndarray,
                 size: tuple[int, int]) -> torch.Tensor:
    """Soft foreground score: projection of each painted colour onto the background -> foreground segment.

    0 at the background colour, 1 at the foreground colour, clipped to [0, 1]. For black/white this is
    mean(RGB), so ``score > 0.5`` is SegGPT's official rule (mean RGB > 128) and also exactly the nearest of
    the two colours.

    Args:
        rgb: (3, h, w) colour space in [0, 1]; background, foreground: (3,) uint8; size: output (H, W).

    Returns:
        (H, W) float in [0, 1].
    """
    rgb = _resize_rgb(rgb, size)
    bg = torch.as_tensor(np.asarray(background), dtype=rgb.dtype, device=rgb.device).view(3, 1, 1) / 255.0
    fg = torch.as_tensor(np.asarray(foreground), dtype=rgb.dtype, device=rgb.device).view(3, 1, 1) / 255.0
    d = fg - bg
    denom = float((d**2).sum())
    if denom == 0.0:
        raise ValueError("background and foreground colours are identical; the mask cannot be decoded")
    return (((rgb - bg) * d).sum(0) / denom).clamp_(0.0, 1.0)


def palette_scores(rgb: torch.Tensor, palette: np.ndarray, size: tuple[int, int],
                   temperature: float = 0.02) -> torch.Tensor:
    """Soft per-class scores for a multi-colour palette: softmax over classes of -squared distance / T.

    Args:
        rgb: (3, h, w) colour space in [0, 1]; palette: (C + 1, 3) uint8; size: output (H, W).
        temperature: in squared [0, 1]-RGB units; 0.02 makes a colour halfway between two palette colours
            255 apart give ~0.5 each and one 1/4 of the way give > 0.99 for the nearer.

    Returns:
        (C + 1, H, W) float, sums to 1 over classes; argmax equals ``nearest_colour``.
    """
    d = _palette_distances(_resize_rgb(rgb, size), palette)
    return torch.softmax(-d / float(temperature), dim=0)
