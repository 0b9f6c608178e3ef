"""Matcher's instance-level scoring, filtering, selection and merging.

Per candidate mask (aim-uofa/Matcher ``RobustPromptSampler.get_mask_scores`` and the end of
``Matcher.mask_generation``):

- ``mask37``: the mask on the encoder patch grid (``cv2.INTER_AREA`` resize > 0, i.e. a cell is on
  if any of its pixels is; an all-empty result turns every cell on);
- ``emd = 1 - EMD(uniform over support foreground patches, uniform over mask37 cells,
  cost (1 - S) / 2)``, exact network simplex via POT's ``ot.emd2`` (float64, stored as float32);
- ``purity = inside / max(|mask37|, 1) + 1e-6`` and ``coverage = inside / P + 1e-6``, ``inside``
  = matched points whose pixel is in the full-size mask;
- ``score = alpha * emd + beta * purity * coverage ** exp`` (float32 torch arithmetic).

Then the metric filters (coverage, emd, purity), and either the score filter (COCO/LVIS) or a
top-k threshold (FSS, parts); the union of the selected masks is the prediction.

Tie-breaking is part of the method: with equal scores the released code's ``torch.topk`` /
``torch.sort`` on a CPU float32 tensor in candidate order decides, so those exact calls are used.

Speed without changing results: identical ``mask37`` patterns share one EMD solve (same inputs ->
same output), the remaining solves run in a thread pool (POT's solver releases the GIL), and
points-in-mask and the patch-grid reduction are vectorised.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import ot
import torch

__all__ = [
    "MetricFilters",
    "Scores",
    "Selection",
    "combine_scores",
    "emd_scores",
    "masks_to_grid",
    "points_inside",
    "purity_coverage",
    "score_candidates",
    "select",
]


def masks_to_grid(masks: torch.Tensor | np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks -> (N, grid, grid) bool patch-grid masks and all-empty fallback flags.

    Equivalent to the released ``cv2.resize(mask, (grid, grid), INTER_AREA) > 0`` (with
    ``> max - 1e-6`` when the resized mask is all zero, which turns every cell on). When H and W
    are multiples of ``grid`` INTER_AREA is a block average of non-negative values, so "> 0" is
    "any pixel of the block"; that case is computed as a block-any, otherwise cv2 is called.
    """
    masks_np = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    n, h, w = masks_np.shape
    if h % grid == 0 and w % grid == 0:
        blocks = masks_np.reshape(n, grid, h // grid, grid, w // grid)
        cells = blocks.any(axis=(2, 4))
    else:
        cells = np.empty((n, grid, grid), dtype=bool)
        for i in range(n):
            cells[i] = cv2.resize(
                masks_np[i].astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA
            ) > 0
    empty = ~cells.reshape(n, -1).any(axis=1)
    cells[empty] = True
    return cells, empty


def emd_scores(
    cost_fg: np.ndarray, cells: np.ndarray, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """``1 - EMD`` per candidate with POT's exact solver.

    Args:
        cost_fg: (L, N) float32 ground cost rows of the support foreground patches (all shots),
            columns = query patches.
        cells: (M, grid, grid) bool patch-grid candidate masks (each with >= 1 cell).
        workers: threads for the independent solves (results do not depend on it).

    Returns:
        ``emd`` (M,) float32 (as the released code stores it) and ``emd_f64`` (M,) float64.
    """
    cost_fg = np.asarray(cost_fg)
    n_rows = cost_fg.shape[0]
    flat = cells.reshape(len(cells), -1)
    # Python lists, as released: POT converts list marginals to the cost's dtype (float32), which changes
    # the result in the last bits compared with float64 arrays, and ties downstream depend on those bits.
    a = [1.0 / n_rows] * n_rows
    keys: dict[bytes, int] = {}
    unique: list[np.ndarray] = []
    which = np.empty(len(flat), dtype=np.int64)
    for i, row in enumerate(flat):
        key = np.packbits(row).tobytes()
        if key not in keys:
            keys[key] = len(unique)
            unique.append(row)
        which[i] = keys[key]

    def solve(row: np.ndarray) -> float:
        sub = cost_fg[:, row]
        b = [1.0 / sub.shape[1]] * sub.shape[1]
        return 1 - float(ot.emd2(a, b, sub))

    if workers > 1 and len(unique) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            values = list(pool.map(solve, unique))
    else:
        values = [solve(row) for row in unique]
    emd64 = np.asarray(values, dtype=np.float64)[which]
    return emd64.astype(np.float32), emd64


def points_inside(masks: torch.Tensor | np.ndarray, points_xy: np.ndarray) -> np.ndarray:
    """(N, H, W) masks x (P, 2) ``(x, y)`` points -> (N, P) bool "the point's pixel is in the mask".

    Points are truncated to integers and clipped to the image, as the released ``is_in_mask``.
    """
    masks_t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    _, h, w = masks_t.shape
    pts = np.asarray(points_xy).astype(np.int64)
    ys = np.clip(pts[:, 1], 0, h - 1)
    xs = np.clip(pts[:, 0], 0, w - 1)
    return masks_t[:, torch.from_numpy(ys), torch.from_numpy(xs)].numpy()


def purity_coverage(
    n_inside: np.ndarray, cell_area: np.ndarray, n_points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Released purity / coverage: Python float ratios, then float32 ``+ 1e-6``."""
    n_inside = np.asarray(n_inside, dtype=np.float64)
    purity = n_inside / np.maximum(np.asarray(cell_area, dtype=np.float64), 1.0)
    coverage = n_inside / float(n_points)
    purity_t = torch.from_numpy(purity.astype(np.float32)) + 1e-6
    coverage_t = torch.from_numpy(coverage.astype(np.float32)) + 1e-6
    return purity_t, coverage_t


def combine_scores(
    emd: torch.Tensor, purity: torch.Tensor, coverage: torch.Tensor, alpha: float, beta: float,
    exp: float,
) -> torch.Tensor:
    """``alpha * emd + beta * purity * coverage ** exp`` in the released float32 op order."""
    return alpha * emd + beta * purity * coverage**exp


@dataclass
class Scores:
    """Per-candidate metrics (fixture ``05_scores`` names), candidate order."""

    mask37: np.ndarray
    mask37_all_zero_fallback: np.ndarray
    mask37_area: np.ndarray
    emd: np.ndarray
    emd_f64: np.ndarray
    points_inside: np.ndarray
    n_points_inside: np.ndarray
    purity: np.ndarray
    coverage: np.ndarray
    score: np.ndarray


def score_candidates(
    masks: torch.Tensor,
    cost_fg: np.ndarray,
    points_xy: np.ndarray,
    *,
    grid: int,
    alpha: float,
    beta: float,
    exp: float,
    emd_workers: int = 1,
) -> Scores:
    """All per-candidate metrics.

    Args:
        masks: (M, H, W) bool candidate masks in the encoder frame.
        cost_fg: (L, grid**2) float32 cost rows of the support foreground patches.
        points_xy: (P, 2) all matched points ``(x, y)`` (never the k-means centres).
        grid: patch grid side (37).
        alpha, beta, exp: score weights.
        emd_workers: threads for the EMD solves.
    """
    cells, empty = masks_to_grid(masks, grid)
    area = cells.reshape(len(cells), -1).sum(axis=1).astype(np.int64)
    emd32, emd64 = emd_scores(cost_fg, cells, workers=emd_workers)
    inside = points_inside(masks, points_xy)
    n_inside = inside.sum(axis=1).astype(np.int64)
    purity, coverage = purity_coverage(n_inside, area, len(points_xy))
    score = combine_scores(torch.from_numpy(emd32), purity, coverage, alpha, beta, exp)
    return Scores(
        mask37=cells,
        mask37_all_zero_fallback=empty,
        mask37_area=area,
        emd=emd32,
        emd_f64=emd64,
        points_inside=inside,
        n_points_inside=n_inside,
        purity=purity.numpy(),
        coverage=coverage.numpy(),
        score=score.numpy(),
    )


@dataclass
class MetricFilters:
    """Thresholds of the released metric filters (0 disables) and selection settings.

    Attributes:
        emd, purity, coverage: keep ``metric >= min(threshold, max metric)`` when > 0, applied in
            the order coverage, emd, purity (``--emd_filter`` etc.).
        use_score_filter: COCO/LVIS selection (``--use_score_filter``).
        score, score_norm: distance thresholds of that path (``--deep_score_filter``,
            ``--deep_score_norm_filter``).
        topk_scores_threshold: top-k path: keep normalised scores above it (0: no normalisation).
        num_merging_mask: masks merged at most (``--num_merging_mask``).
    """

    emd: float = 0.0
    purity: float = 0.0
    coverage: float = 0.0
    use_score_filter: bool = False
    score: float = 0.33
    score_norm: float = 0.1
    topk_scores_threshold: float = 0.7
    num_merging_mask: int = 10


@dataclass
class Selection:
    """Selection outcome; index arrays refer to candidates (fixture ``05_scores`` names)."""

    after_metric_filters: np.ndarray
    selected: np.ndarray
    path: str
    metric_filters: list[dict] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def select(
    emd: np.ndarray,
    purity: np.ndarray,
    coverage: np.ndarray,
    score: np.ndarray,
    cfg: MetricFilters,
    *,
    topk_override: np.ndarray | None = None,
    rank_override: np.ndarray | None = None,
) -> Selection:
    """Metric filters, then the score-filter or top-k selection of the released code.

    Args:
        emd, purity, coverage, score: (M,) float32 per-candidate metrics, candidate order.
        cfg: :class:`MetricFilters`.
        topk_override, rank_override: replay recorded tie-breaks (parity tests continue from the
            fixture's decision after a float-noise flip); positions refer to the filtered list.

    Returns:
        :class:`Selection` (``selected`` empty only if every score is <= 0 on the top-k path).
    """
    metrics = {
        "emd": torch.from_numpy(np.asarray(emd, np.float32)),
        "purity": torch.from_numpy(np.asarray(purity, np.float32)),
        "coverage": torch.from_numpy(np.asarray(coverage, np.float32)),
    }
    scores = torch.from_numpy(np.asarray(score, np.float32))
    idx_all = torch.arange(len(scores))
    applied = []
    for name in ("coverage", "emd", "purity"):
        threshold = getattr(cfg, name)
        if threshold > 0 and len(scores):
            thres = min(threshold, metrics[name].max())
            keep = torch.where(metrics[name] >= thres)[0]
            scores = scores[keep]
            idx_all = idx_all[keep]
            metrics = {k: v[keep] for k, v in metrics.items()}
            applied.append(
                {"metric": name, "cfg": threshold, "threshold": float(thres), "kept": len(keep)}
            )
    after = idx_all.numpy().astype(np.int64)
    if len(scores) == 0:
        return Selection(after, np.zeros(0, np.int64), "empty", applied)

    if cfg.use_score_filter:
        distances = 1 - scores
        distances, rank = torch.sort(distances, descending=False)
        if rank_override is not None:
            rank = torch.as_tensor(np.asarray(rank_override), dtype=torch.int64)
            distances = (1 - scores)[rank]
        distances_norm = distances - distances.min()
        distances_norm = distances_norm / (distances.max() + 1e-6)
        pass_score = distances < cfg.score
        pass_score[..., 0] = True
        pass_norm = distances_norm < cfg.score_norm
        passed = pass_score * pass_norm
        chosen = rank[passed][: cfg.num_merging_mask]
        extras = {
            "ranked": idx_all[rank].numpy(),
            "distances": distances.numpy(),
            "distances_norm": distances_norm.numpy(),
            "pass_score": pass_score.numpy(),
            "pass_score_norm": pass_norm.numpy(),
        }
        return Selection(after, idx_all[chosen].numpy(), "score_filter", applied, extras)

    k = min(cfg.num_merging_mask, scores.size(0))
    topk_idx = scores.topk(k)[1]
    if topk_override is not None:
        topk_idx = torch.as_tensor(np.asarray(topk_override), dtype=torch.int64)
    topk_scores = scores[topk_idx].numpy()
    normalised = topk_scores
    if cfg.topk_scores_threshold > 0:
        normalised = topk_scores / topk_scores.max()
    keep = normalised > cfg.topk_scores_threshold
    extras = {
        "topk": idx_all[topk_idx].numpy(),
        "topk_scores": topk_scores,
        "topk_scores_normalised": normalised,
    }
    return Selection(after, idx_all[topk_idx].numpy()[keep], "topk", applied, extras)


def union(masks: torch.Tensor, selected: np.ndarray) -> torch.Tensor:
    """(H, W) bool union of ``masks[selected]`` (all False when nothing is selected)."""
    if len(selected) == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.bool)
    return masks[torch.as_tensor(selected, dtype=torch.int64)].any(dim=0)
