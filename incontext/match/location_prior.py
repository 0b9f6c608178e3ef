"""PerSAM's location prior: target embedding from one reference, cosine map and point prompts.

Follows ``persam.py`` / ``persam_f.py`` of ZrrSkywalker/Personalize-SAM @ a7e87245 (see
``../shared/reference/persam.md`` sections 2-4). Every function takes and returns tensors; nothing
here reads files or knows the SAM model object. Frames used in this module:

- *original*: the image as given, ``(H, W)`` pixels;
- *input*: after SAM's ``ResizeLongestSide(img_size)``, ``(h', w')`` with ``max(h', w') ==
  img_size``;
- *padded*: the input zero-padded to ``(img_size, img_size)`` (bottom/right), what SAM's encoder
  sees;
- *grid*: SAM's image-embedding grid, ``(gh, gw)`` (64 x 64 for every released SAM).

Points are ``(x, y)`` = (column, row) in original pixels, like SAM's predictor expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from incontext.errors import InputError

__all__ = [
    "MaskGrid",
    "TargetEmbedding",
    "LocationMap",
    "official_mask_grid",
    "area_mask_grid",
    "foreground_features",
    "target_embedding",
    "location_map",
    "upsample_to_original",
    "select_points",
    "attention_bias",
]

# PerSeg masks are palette PNGs whose foreground decodes to RGB (128, 0, 0); the official mask path
# depends on that red value (section 2 of the reference note), so binary masks are painted with it.
PERSEG_FOREGROUND_RED = 128


@dataclass(frozen=True)
class MaskGrid:
    """Reference mask on SAM's embedding grid.

    Attributes:
        values: (gh, gw) float32; for the official rule the normalised red channel resampled to the
            grid.
        cells: (gh, gw) bool; the foreground cells used to build the target embedding.
    """

    values: torch.Tensor
    cells: torch.Tensor


@dataclass(frozen=True)
class TargetEmbedding:
    """Reference-derived vectors (C = SAM prompt/decoder width, 256 for released SAMs).

    Attributes:
        raw: (C,) mean neck feature over the foreground cells, un-normalised (PerSAM's semantic
            prompt).
        sim: (C,) unit vector compared with query features (mean, or (max + mean) / 2 for PerSAM-F).
        mean: (C,) mean feature over the foreground cells.
        max: (C,) channel-wise max over the foreground cells.
    """

    raw: torch.Tensor
    sim: torch.Tensor
    mean: torch.Tensor
    max: torch.Tensor


@dataclass(frozen=True)
class LocationMap:
    """Cosine location confidence of a target on one image.

    Attributes:
        grid: (gh, gw) cosine similarity on the embedding grid.
        lowres: (4 gh, 4 gw) the grid map upsampled x4 (bilinear), SAM's low-res mask frame.
        full: (H, W) the map in the original frame (SAM's mask post-processing applied to
            ``lowres``).
    """

    grid: torch.Tensor
    lowres: torch.Tensor
    full: torch.Tensor


def _red_channel(mask: np.ndarray, name: str) -> np.ndarray:
    """Red channel (H, W) uint8 of a mask given as (H, W) or (H, W, 3) uint8/bool."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] >= 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise InputError(f"{name}: expected a (H, W) or (H, W, 3) mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8) * PERSEG_FOREGROUND_RED
    if mask.dtype != np.uint8:
        raise InputError(
            f"{name}: expected a uint8 or bool mask, got dtype {mask.dtype}; convert it with "
            "incontext.io.read_mask or pass a boolean array"
        )
    return mask


def official_mask_grid(
    mask_red: np.ndarray,
    grid_hw: tuple[int, int],
    *,
    img_size: int = 1024,
    pixel_mean_r: float = 123.675,
    pixel_std_r: float = 58.395,
) -> MaskGrid:
    """The reference mask on the embedding grid exactly as the official scripts compute it (quirk).

    The published predictor resizes the 3-channel mask image like the image (PIL bilinear via
    ``ResizeLongestSide``), normalises it with SAM's *pixel* mean/std, zero-pads it to ``img_size``,
    and the script bilinearly resizes that tensor to the grid (no antialias) and keeps cells whose
    red value is ``> 0``. With PerSeg's red value 128 (normalised to about +0.074, background about
    -2.118) a cell counts only when nearly all the few pixels the bilinear sampling reads are
    foreground; cells that mix foreground with zero padding count too. Reproduced here for
    bit-parity (``mask_grid: official``).

    Args:
        mask_red: (H, W) uint8 red channel of the mask image as the official code reads it (PerSeg:
            128 = foreground), or a bool (H, W) mask, painted with red 128 as PerSeg does. A (H, W,
            3) array is accepted and its channel 0 used.
        grid_hw: (gh, gw) embedding grid size (the official code takes it from the features).
        img_size: SAM's input side (``image_encoder.img_size``).
        pixel_mean_r, pixel_std_r: SAM's pixel mean/std of the red channel.

    Returns:
        MaskGrid with ``values`` (gh, gw) float32 and ``cells = values > 0``.
    """
    red = _red_channel(mask_red, "mask_red")
    h, w = red.shape
    # ResizeLongestSide.apply_image resizes the 3-channel uint8 image with PIL; only channel 0
    # matters and PIL resamples bands independently, so a 3-band image with empty green/blue is
    # equivalent.
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[..., 0] = red
    resized = ResizeLongestSide(img_size).apply_image(rgb)[..., 0]
    x = torch.as_tensor(resized).float()[None, None]
    x = (x - pixel_mean_r) / pixel_std_r
    x = F.pad(x, (0, img_size - x.shape[-1], 0, img_size - x.shape[-2]))
    values = F.interpolate(x, size=tuple(grid_hw), mode="bilinear")[0, 0]
    return MaskGrid(values=values, cells=values > 0)


def area_mask_grid(
    mask: np.ndarray, grid_hw: tuple[int, int], *, img_size: int = 1024, threshold: float = 0.5
) -> MaskGrid:
    """Non-default alternative to the quirk: cells whose covered fraction exceeds ``threshold``.

    The mask (bool or uint8, > 0 = foreground) is resized like the image (nearest), zero-padded, and
    average-pooled to the grid, so ``values`` is the covered fraction in [0, 1].
    """
    fg = _red_channel(mask, "mask") > 0
    h, w = fg.shape
    nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, img_size)
    x = torch.as_tensor(fg, dtype=torch.float32)[None, None]
    x = F.interpolate(x, size=(nh, nw), mode="nearest")
    x = F.pad(x, (0, img_size - nw, 0, img_size - nh))
    values = F.adaptive_avg_pool2d(x, tuple(grid_hw))[0, 0]
    return MaskGrid(values=values, cells=values > threshold)


def foreground_features(features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The reference's "local features": (N, C) features of the foreground grid cells, row-major.

    Args:
        features: (C, gh, gw) SAM neck features of the reference (image-embedding grid).
        cells: (gh, gw) bool foreground cells (``MaskGrid.cells``).
    """
    if features.ndim != 3 or tuple(features.shape[1:]) != tuple(cells.shape):
        raise InputError(
            f"features: expected (C, gh, gw) matching cells {tuple(cells.shape)}, "
            f"got {tuple(features.shape)}"
        )
    # HWC boolean indexing like the official script, so later reductions round identically.
    return features.permute(1, 2, 0)[cells.to(features.device)]


def target_embedding(local_features: torch.Tensor, *, sim_vector: str = "mean") -> TargetEmbedding:
    """Target vectors from foreground-cell features (of one or several references).

    Args:
        local_features: (N, C) features of the foreground cells (:func:`foreground_features`).
        sim_vector: ``"mean"`` (``persam.py``) or ``"max_mean"`` ((max + mean) / 2,
            ``persam_f.py``): the vector L2-normalised into ``sim``.

    Raises:
        InputError: no foreground cell (the official code would average an empty set into NaN).
    """
    if local_features.ndim != 2 or local_features.shape[0] == 0:
        raise InputError(
            "reference mask: no foreground cell on SAM's feature grid (the mask is empty or "
            "thinner than about a 16x16-pixel block at SAM's 1024 input scale, which the official "
            "rule needs); use a "
            "larger mask or set mask_grid=area"
        )
    mean = local_features.mean(0)
    mx = torch.max(local_features, dim=0)[0]
    if sim_vector == "mean":
        v = mean.unsqueeze(0)
    elif sim_vector == "max_mean":
        v = (mx / 2 + mean / 2).unsqueeze(0)
    else:
        raise InputError(f"sim_vector: expected 'mean' or 'max_mean', got {sim_vector!r}")
    sim = (v / v.norm(dim=-1, keepdim=True))[0]
    return TargetEmbedding(raw=mean, sim=sim, mean=mean, max=mx)


def upsample_to_original(
    x: torch.Tensor, *, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """SAM's mask post-processing: (B, C, h, w) -> (B, C, H, W) in the original frame.

    Bilinear to the padded frame (``img_size`` squared), crop the valid ``input_size`` region,
    bilinear to ``original_size`` (all ``align_corners=False``), like ``Sam.postprocess_masks``.
    """
    x = F.interpolate(x, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(
        x, tuple(int(s) for s in original_size), mode="bilinear", align_corners=False
    )


def location_map(
    target_sim: torch.Tensor,
    features: torch.Tensor,
    *,
    img_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> LocationMap:
    """Cosine map of a unit target vector against L2-normalised features, up to the original frame.

    Args:
        target_sim: (C,) unit target vector (``TargetEmbedding.sim``).
        features: (C, gh, gw) SAM neck features of the image.
        img_size, input_size, original_size: SAM frames of that image (see the module docstring).
    """
    c, gh, gw = features.shape
    feat = features / features.norm(dim=0, keepdim=True)
    sim = target_sim.reshape(1, c) @ feat.reshape(c, gh * gw)
    grid = sim.reshape(1, 1, gh, gw)
    lowres = F.interpolate(grid, scale_factor=4, mode="bilinear")
    full = upsample_to_original(
        lowres, img_size=img_size, input_size=input_size, original_size=original_size
    )
    return LocationMap(grid=grid[0, 0], lowres=lowres[0, 0], full=full[0, 0])


def select_points(sim_full: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Positive (argmax) and negative (argmin) point of a full-resolution map.

    Uses ``topk(1)`` on the row-major flattened map like the official ``point_selection`` (its
    tie-breaking included).

    Returns:
        (positive_xy, negative_xy), each (1, 2) int64, (x, y) in the map's (original) frame.
    """
    w = sim_full.shape[1]
    flat = sim_full.flatten()
    pos = int(flat.topk(1)[1][0])
    neg = int(flat.topk(1, largest=False)[1][0])
    return (
        np.array([[pos % w, pos // w]], dtype=np.int64),
        np.array([[neg % w, neg // w]], dtype=np.int64),
    )


def attention_bias(sim_full: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Target-guided attention bias: sigmoid of the z-scored map resized to the token grid.

    The official code z-scores the full-resolution map (unbiased std), resizes it bilinearly to a
    hard-coded 64 x 64 and applies a sigmoid; ``grid_hw`` is taken from the features here (64 x 64
    for every released SAM, so identical in practice). Quirk kept for parity: the map resized is the
    *original-frame* map, while the decoder's image tokens cover the *padded* square, so for a
    non-square image the bias grid is stretched over the tokens (cell (i, j) of the bias describes
    original row i * H / gh, column j * W / gw).

    Returns:
        (1, 1, 1, gh * gw) float32 in (0, 1), broadcast over batch, heads and query tokens.
    """
    z = (sim_full - sim_full.mean()) / torch.std(sim_full)
    z = F.interpolate(z[None, None], size=tuple(grid_hw), mode="bilinear")
    return z.sigmoid().unsqueeze(0).flatten(3)
