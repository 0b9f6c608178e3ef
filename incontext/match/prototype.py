"""Prototype matching: the training-free baseline every learned stage is compared against.

Masked average pooling of support features gives one foreground prototype per shot (PANet-style); the
background, which is many things at once, gets several prototypes from k-means over the supports' background
cells. A query cell is foreground when it is closer (cosine) to a foreground prototype than to every background
prototype: ``prob = sigmoid(temperature * (max_fg_sim - max_bg_sim))``, so the decision threshold 0.5 is exactly
that nearest-prototype rule. Features are standardised per channel with the supports' statistics (prepare-time
only), so the decision does not depend on the query.

Clean-up after upsampling the probability to the query's size: connected components smaller than
``min_area`` (fraction of the image) are dropped; they are almost always texture noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from incontext.episode import Support
from incontext.features.base import DenseFeatures, pool_mask
from incontext.pipeline import Carry, resize_map


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cosine k-means of rows of ``x`` (N, C), deterministic for ``seed``; returns (min(k, N), C) centres."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = F.normalize(members.mean(0), dim=0)
    return centres


class PrototypeMatch:
    """Match stage: nearest-prototype foreground probability.

    Args:
        features: a ``DenseFeatures`` extractor (offline default: ``HandcraftedFeatures``).
        bg_prototypes: number of k-means background prototypes.
        temperature: scale of the similarity difference before the sigmoid.
        fg_threshold: a grid cell counts as foreground support when this fraction of it is masked.
        min_area: components smaller than this fraction of the query are removed.
    """

    def __init__(
        self,
        features: DenseFeatures,
        bg_prototypes: int = 5,
        temperature: float = 10.0,
        fg_threshold: float = 0.5,
        min_area: float = 0.001,
    ) -> None:
        self.features = features
        self.bg_prototypes = int(bg_prototypes)
        self.temperature = float(temperature)
        self.fg_threshold = float(fg_threshold)
        self.min_area = float(min_area)

    def to(self, device: str | torch.device) -> "PrototypeMatch":
        if hasattr(self.features, "to"):
            self.features.to(device)
        return self

    def _encode(self, image: np.ndarray, cache: dict | None = None) -> torch.Tensor:
        key = ("features", self.features.name)
        if cache is not None and key in cache:
            return cache[key]
        f = self.features(image).float()
        if cache is not None:
            cache[key] = f
        return f

    def prepare(self, supports: list[Support]) -> dict[str, Any]:
        feats, fg_cells, bg_cells = [], [], []
        for s in supports:
            f = self._encode(s.image)
            cover = pool_mask(s.mask, tuple(f.shape[1:])).to(f.device)
            flat = f.flatten(1).T
            fg = cover.flatten() >= self.fg_threshold
            if not fg.any():
                # A thin object may not fill half of any cell: use the cells it covers most.
                fg = cover.flatten() >= cover.max() * 0.5
            feats.append(flat)
            fg_cells.append(fg)
            bg_cells.append(cover.flatten() == 0)
        allf = torch.cat(feats)
        mean, std = allf.mean(0), allf.std(0).clamp_min(1e-3)
        norm = [F.normalize((f - mean) / std, dim=1) for f in feats]
        fg_protos = torch.stack([F.normalize(n[m].mean(0), dim=0) for n, m in zip(norm, fg_cells)])
        bg = torch.cat([n[m] for n, m in zip(norm, bg_cells)])
        if len(bg) == 0:  # mask covers the whole support: compare against "anything else" = zero vector
            bg_protos = torch.zeros(1, allf.shape[1], device=allf.device)
        else:
            bg_protos = kmeans(bg, self.bg_prototypes)
        return {"mean": mean, "std": std, "fg": fg_protos, "bg": bg_protos}

    def similarity(self, query: np.ndarray, state: dict, cache: dict) -> torch.Tensor:
        """(h, w) foreground probability on the feature grid."""
        f = self._encode(query, cache)
        c, h, w = f.shape
        q = F.normalize((f.flatten(1).T - state["mean"]) / state["std"], dim=1)
        s_fg = (q @ state["fg"].T).max(1).values
        s_bg = (q @ state["bg"].T).max(1).values
        return torch.sigmoid(self.temperature * (s_fg - s_bg)).view(h, w)

    def __call__(self, carry: Carry, state: dict) -> None:
        prior = self.similarity(carry.query, state, carry.cache)
        carry.prior = prior
        h, w = carry.query.shape[:2]
        prob = resize_map(prior, (h, w)).clamp(0, 1)
        carry.prob = prob
        carry.mask = torch.from_numpy(remove_small(prob.cpu().numpy() > 0.5, self.min_area))
        carry.extras.setdefault("stage_scores", {})["match"] = float(prior.max())


def remove_small(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop connected components smaller than ``min_area`` × image area."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = areas >= min_area * mask.size
    return keep[labels]
