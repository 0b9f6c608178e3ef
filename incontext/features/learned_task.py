"""Training the patch encoder of :mod:`incontext.features.learned` with ``train.py`` (a ``TrainTask``).

The objective is the decision Matcher's forward matching makes: a query cell belongs to the target when its
nearest support-foreground cell is very similar. Per episode, each query cell gets the logit
``scale * max_j cos(q_i, s_j) + bias`` over the support's foreground cells ``j`` and a binary cross-entropy
against whether the cell is target; the same is done the other way round (support cells against the query's
target cells, Matcher's reverse matching). The episodes come from the procedural benchmark's train classes, whose
queries hold look-alike distractors (same shape, same pattern, same colours), so the features must encode the
combination that names a class. Cells that are only partly covered (between ``ignore`` fractions) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from incontext.features.base import pool_mask
from incontext.features.learned import (
    LearnedFeatures,
    PatchEncoder,
    PatchEncoderConfig,
    _square,
)
from incontext.train.data import TrainItem

__all__ = ["PatchEncoderTask"]


class PatchEncoderTask:
    """``TrainTask`` for :class:`PatchEncoder`.

    Args:
        model: :class:`PatchEncoderConfig` fields.
        ignore: (low, high) coverage fractions between which a cell is neither target nor background.
        hflip: probability of flipping an episode's images horizontally (all of them together).
        colour_jitter: std of a per-image brightness/contrast change, so absolute intensity is not the cue.
    """

    name = "patch_encoder"

    def __init__(self, model: dict[str, Any] | None = None, ignore: tuple[float, float] = (0.25, 0.75),
                 hflip: float = 0.5, colour_jitter: float = 0.1) -> None:
        self.config = PatchEncoderConfig.from_dict(model or {})
        self.ignore = (float(ignore[0]), float(ignore[1]))
        self.hflip = float(hflip)
        self.colour_jitter = float(colour_jitter)

    def build_model(self) -> torch.nn.Module:
        return PatchEncoder(self.config)

    def make_sample(self, item: TrainItem, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``query`` / ``support`` (3, S, S) float in [0, 255]; ``query_cells`` / ``support_cells`` (g, g) with
        1 = target, 0 = background, -1 = ignored (S = the encoder's input side, g its grid)."""
        side, g = self.config.input_size, self.config.grid
        flip = rng.random() < self.hflip
        sup = item.supports[0]

        def image(a: np.ndarray) -> torch.Tensor:
            x = _square(a, side).astype(np.float32)
            gain = 1.0 + self.colour_jitter * rng.standard_normal()
            shift = 255 * self.colour_jitter * rng.standard_normal()
            x = np.clip(x * gain + shift, 0, 255)
            t = torch.from_numpy(x).permute(2, 0, 1)
            return t.flip(-1) if flip else t

        def cells(m: np.ndarray) -> torch.Tensor:
            f = pool_mask((m > 0).astype(np.float32), (g, g))
            out = torch.full_like(f, -1.0)
            out[f >= self.ignore[1]] = 1.0
            out[f <= self.ignore[0]] = 0.0
            return out.flip(-1) if flip else out

        return {"query": image(item.query), "support": image(sup.image),
                "query_cells": cells(item.query_mask), "support_cells": cells(sup.mask)}

    @staticmethod
    def _direction(model: PatchEncoder, a: torch.Tensor, b: torch.Tensor, a_cells: torch.Tensor,
                   b_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BCE of every cell of ``a`` against ``b``'s target cells, its count and the cells' accuracy."""
        sim = torch.einsum("bnc,bmc->bnm", a, b)  # (B, Na, Nb) cosine
        fg_b = (b_cells == 1).flatten(1)  # (B, Nb)
        best = sim.masked_fill(~fg_b[:, None, :], -2.0).amax(-1)  # nearest target cell of b
        logit = model.logit_scale * best + model.logit_bias
        target = a_cells.flatten(1)
        valid = (target >= 0) & fg_b.any(1, keepdim=True)
        bce = F.binary_cross_entropy_with_logits(logit, target.clamp(min=0), reduction="none")
        acc = ((logit > 0).float() == target).float()
        return (bce * valid).sum(), valid.sum(), (acc * valid).sum()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        m = getattr(model, "module", model)
        x = torch.cat([batch["query"], batch["support"]])
        f = F.normalize(model(PatchEncoder.normalize(x)), dim=1).flatten(2).transpose(1, 2)  # (2B, N, C)
        q, s = f.chunk(2)
        l1, n1, a1 = self._direction(m, q, s, batch["query_cells"], batch["support_cells"])
        l2, n2, a2 = self._direction(m, s, q, batch["support_cells"], batch["query_cells"])
        n = (n1 + n2).clamp(min=1)
        loss = (l1 + l2) / n
        return loss, {"cell_acc": float((a1 + a2) / n), "scale": float(m.logit_scale.detach()),
                      "bias": float(m.logit_bias.detach())}

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        getattr(model, "module", model).save_pretrained(directory)

    def segmenter(self, model: torch.nn.Module, device: torch.device):
        """``prototype`` (nearest-prototype matching, configs/method/prototype.yaml) on the live encoder's
        features: a cheap read-out of how well the features separate the target from everything else."""
        from incontext.match.prototype import PrototypeMatch
        from incontext.pipeline import Pipeline

        feats = LearnedFeatures(getattr(model, "module", model), device=device)
        return Pipeline(name="prototype_learned", match=PrototypeMatch(feats), device=device)
