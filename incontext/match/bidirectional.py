"""Matcher's patch-level bidirectional matching (Liu et al., ICLR 2024, aim-uofa/Matcher).

Frames: images are square ``image_size`` px (518 for DINOv2/14), the patch grid is ``grid x grid``
(37 x 37), patch index ``i = row * grid + col``. Support rows of the similarity matrix are shot after
shot: shot ``s``, patch ``p`` -> row ``s * grid**2 + p``. Points are ``(x, y)`` patch centres in the
``image_size`` frame.

The computation follows the released ``Matcher.patch_level_matching`` step by step, including its
tie-breaking: both Hungarian solves use ``scipy.optimize.linear_sum_assignment`` on the float32
similarities, the kept pairs are ranked with ``torch.sort`` (not a stable sort), and the matched
query patches are de-duplicated in CPython ``list(set(...))`` order, which every later stage sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "MatchResult",
    "bidirectional_match",
    "l2_normalise",
    "patch_centres",
    "patch_foreground",
    "points_box",
]


def patch_foreground(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Support masks -> patch masks with Matcher's "any pixel" rule.

    Args:
        masks: (K, H, W) bool/0-1 support masks in the encoder frame (H, W multiples of
            ``patch_size``).
        patch_size: encoder patch size (14 for DINOv2).

    Returns:
        (K, H // patch_size, W // patch_size) bool: a patch is foreground if any of its pixels is
        (the released code average-pools and thresholds at SAM's mask threshold 0). When every
        shot's mask is empty, a ``patch_size`` square at the image centre of every shot is used
        instead (the released ``reference_masks_verification``).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W); got shape {tuple(masks.shape)}")
    k, h, w = masks.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {patch_size}")
    fg = masks.bool().clone()
    if not fg.any():
        half = patch_size // 2
        fg[:, h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = True
    blocks = fg.reshape(k, h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.any(dim=4).any(dim=2)


def l2_normalise(tokens: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation, ``x / max(||x||, 1e-12)`` (``F.normalize``, as released)."""
    return F.normalize(tokens, dim=-1, p=2)


def points_box(points_xy: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(4,) int64 ``x0, y0, x1, y1``: min/max of the points, clipped to the (H, W) image (parts config)."""
    h, w = image_size
    return np.array(
        [
            max(points_xy[:, 0].min(), 0),
            max(points_xy[:, 1].min(), 0),
            min(points_xy[:, 0].max(), w - 1),
            min(points_xy[:, 1].max(), h - 1),
        ],
        dtype=np.int64,
    )


def patch_centres(indices: np.ndarray, grid: int, patch_size: int) -> np.ndarray:
    """Patch indices -> (N, 2) int64 ``(x, y)`` centres in the image frame."""
    indices = np.asarray(indices, dtype=np.int64)
    x = (indices % grid) * patch_size + patch_size // 2
    y = (indices // grid) * patch_size + patch_size // 2
    return np.stack([x, y], axis=1).reshape(-1, 2)


@dataclass
class MatchResult:
    """Output of :func:`bidirectional_match` (names follow the parity fixture ``02_matching``).

    Attributes:
        similarity: (K*N, N) float32 cosine similarities S, support rows x query patches.
        cost: (K*N, N) float32 ``(1 - S) / 2``, the EMD ground cost used by instance scoring.
        fg_support_indices: (F,) int64 foreground support rows, ascending.
        forward_rows, forward_cols: (F',) int64 forward Hungarian pairs (rows index the F
            foreground rows; cols are query patches). F' = min(F, N).
        forward_support_indices: (F',) int64 support rows of the forward pairs.
        forward_sim: (F',) float32 similarity of each forward pair.
        reverse_cols: (F',) int64 support row that the reverse Hungarian gives each matched query
            patch (rows of the reverse problem in ``forward_cols`` order).
        retain: (F',) bool reverse partner lies in the support foreground (any shot).
        fallback_keep_all: nothing was retained, so every forward pair was kept.
        kept_support_indices, kept_cols, kept_sim: (R,) the kept forward pairs.
        reduced_points_num: ``R // 2`` if ``R > 40`` else ``R``.
        sort_order: (R,) ``torch.sort(kept_sim, descending=True)`` indices.
        top_target_indices_sorted: (reduced_points_num,) query patches of the best pairs.
        points_target_indices: (P,) those patches de-duplicated in CPython set order.
        points_xy: (P, 2) int64 patch centres ``(x, y)`` in the image frame.
        box: (4,) int64 ``x0, y0, x1, y1`` box around the points (clipped to the image) or None.
    """

    similarity: torch.Tensor
    cost: torch.Tensor
    fg_support_indices: np.ndarray
    forward_rows: np.ndarray
    forward_cols: np.ndarray
    forward_support_indices: np.ndarray
    forward_sim: np.ndarray
    reverse_cols: np.ndarray
    retain: np.ndarray
    fallback_keep_all: bool
    kept_support_indices: np.ndarray
    kept_cols: np.ndarray
    kept_sim: np.ndarray
    reduced_points_num: int
    sort_order: np.ndarray
    top_target_indices_sorted: np.ndarray
    points_target_indices: np.ndarray
    points_xy: np.ndarray
    box: np.ndarray | None


def cpython_set_order(values: list[int]) -> list[int]:
    """De-duplicate ``values`` in the order CPython's ``list(set(values))`` gives.

    The released code relies on this order (it feeds k-means++ and the random prompt draws), so it
    is reproduced literally rather than replaced by a sorted or first-seen order.
    """
    return list(set(values))


def bidirectional_match(
    support_tokens: torch.Tensor,
    query_tokens: torch.Tensor,
    support_fg: torch.Tensor,
    *,
    grid: int,
    patch_size: int,
    image_size: tuple[int, int],
    use_box: bool = False,
    forward_override: tuple[np.ndarray, np.ndarray] | None = None,
    reverse_override: np.ndarray | None = None,
    sort_override: np.ndarray | None = None,
) -> MatchResult:
    """Forward + reverse Hungarian matching and Matcher's point selection.

    Args:
        support_tokens: (K*N, C) float32 L2-normalised support patch tokens (shots concatenated).
        query_tokens: (N, C) float32 L2-normalised query patch tokens, N = grid**2.
        support_fg: (K*N,) bool foreground support patches (:func:`patch_foreground`, flattened).
        grid: patch grid side (37).
        patch_size: encoder patch size (14).
        image_size: (H, W) of the encoder frame (518, 518).
        use_box: also return the box around the matched points (parts config).
        forward_override, reverse_override, sort_override: replay recorded decisions (forward pairs,
            reverse columns, ranking of the kept pairs); parity tests use these to continue after a
            float-noise flip. ``None`` computes them.

    Returns:
        :class:`MatchResult`.
    """
    if support_tokens.ndim != 2 or query_tokens.ndim != 2:
        raise ValueError("support_tokens and query_tokens must be 2-D (rows, channels)")
    n_query = query_tokens.shape[0]
    if n_query != grid * grid:
        raise ValueError(f"query has {n_query} tokens but grid {grid} needs {grid * grid}")
    support_fg = support_fg.reshape(-1).bool()
    if support_fg.numel() != support_tokens.shape[0]:
        raise ValueError("support_fg must have one entry per support token")

    similarity = support_tokens @ query_tokens.t()
    cost = (1 - similarity) / 2
    s_forward = similarity[support_fg]
    if forward_override is None:
        f_rows, f_cols = linear_sum_assignment(s_forward.numpy(), maximize=True)
    else:
        f_rows, f_cols = forward_override
    f_rows = torch.as_tensor(np.asarray(f_rows), dtype=torch.int64)
    f_cols = torch.as_tensor(np.asarray(f_cols), dtype=torch.int64)
    forward_sim = s_forward[f_rows, f_cols]
    fg_indices = support_fg.nonzero()[:, 0]

    s_reverse = similarity.t()[f_cols]
    if reverse_override is None:
        _, r_cols = linear_sum_assignment(s_reverse.numpy(), maximize=True)
    else:
        r_cols = reverse_override
    r_cols = torch.as_tensor(np.asarray(r_cols), dtype=torch.int64)
    retain = torch.isin(r_cols, fg_indices)
    fallback = not bool(retain.any())
    if fallback:
        kept_rows, kept_cols, kept_sim = f_rows, f_cols, forward_sim
    else:
        kept_rows, kept_cols, kept_sim = f_rows[retain], f_cols[retain], forward_sim[retain]

    n_kept = len(kept_sim)
    reduced = n_kept // 2 if n_kept > 40 else n_kept
    _, order = torch.sort(kept_sim, descending=True)
    if sort_override is not None:
        order = torch.as_tensor(np.asarray(sort_override), dtype=torch.int64)
    top = kept_cols[order[:reduced]]
    unique = np.asarray(cpython_set_order(top.tolist()), dtype=np.int64)
    points = patch_centres(unique, grid, patch_size)
    h, w = image_size
    inside = (points[:, 0] < w) & (points[:, 1] < h)
    points = points[inside]
    unique = unique[inside]

    box = points_box(points, image_size) if use_box and len(points) else None

    return MatchResult(
        similarity=similarity,
        cost=cost,
        fg_support_indices=fg_indices.numpy(),
        forward_rows=f_rows.numpy(),
        forward_cols=f_cols.numpy(),
        forward_support_indices=fg_indices[f_rows].numpy(),
        forward_sim=forward_sim.numpy(),
        reverse_cols=r_cols.numpy(),
        retain=retain.numpy(),
        fallback_keep_all=fallback,
        kept_support_indices=fg_indices[kept_rows].numpy(),
        kept_cols=kept_cols.numpy(),
        kept_sim=kept_sim.numpy(),
        reduced_points_num=reduced,
        sort_order=order.numpy(),
        top_target_indices_sorted=top.numpy(),
        points_target_indices=unique,
        points_xy=points,
        box=box,
    )
