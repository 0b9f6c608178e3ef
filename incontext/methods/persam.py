"""``method=persam`` and ``method=persam_f``: one-shot personalisation of SAM (Zhang et al., 2024).

Prepare once, segment many: ``prepare(supports)`` encodes the reference(s) with SAM and keeps
everything the query side needs in a ``Context`` (target vectors, the reference's foreground-cell
features, PerSAM-F's fitted weights and the settings), so a saved concept needs neither the
reference image nor another fit. Segmenting a query costs one SAM encoder pass (kept in the
per-query ``cache`` under ``"sam_embedding"``, so several concepts on one query share it:
``segment_concepts(query, [ctx_a, ctx_b])`` labels concept i with i + 1) plus three decoder passes
per concept.

Settings that shape the query-side computation (``attention``, ``semantic``, ``guidance``) are
stored in the Context when it is prepared and read back from it when segmenting, so a saved concept
gives the same masks whatever the current config says. The SAM that prepared a concept is recorded
(its name and width); using a concept with another SAM is refused.

Several supports (not in the paper, which is one-shot): the foreground-cell features of all
references are pooled into one set (the target vectors are their mean / max), and PerSAM-F fits its
two weights on all references' pixels at once. With one support both are exactly the official
computation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from incontext.backbones.sam import BatchedSamPredictor
from incontext.episode import Instance, Support
from incontext.errors import InputError
from incontext.match.location_prior import (
    PERSEG_FOREGROUND_RED,
    area_mask_grid,
    foreground_features,
    location_map,
    official_mask_grid,
    select_points,
    target_embedding,
)
from incontext.pipeline import BinaryResult, Segmenter, State
from incontext.refine.persam_decoder import GUIDANCE_MODES, decode, persam_cascade, persam_f_cascade
from incontext.refine.persam_f import fit_mask_weights

__all__ = ["PerSAM", "PerSAMF", "CACHE_KEY"]

CACHE_KEY = "sam_embedding"
MASK_GRIDS = ("official", "area")


class PerSAM(Segmenter):
    """Training-free PerSAM.

    Args:
        sam: backbones' ``BatchedSamPredictor`` (``configs/backbone/sam_*.yaml``).
        mask_grid: ``"official"`` (the published mask-to-grid rule with its quirk, for parity) or
            ``"area"`` (cells more than half covered by the mask).
        foreground_value: red value the official rule paints foreground with (PerSeg masks: 128);
            only used by ``mask_grid="official"``.
        attention: target-guided attention in the first decoder pass.
        semantic: target-semantic prompting in the first decoder pass.
        guidance: hook semantics, ``"official"`` (the published fork) or ``"hf"`` (transformers'
            SamModel).
        name, device, retriever, shots: see ``Segmenter``.
    """

    sim_vector = "mean"

    def __init__(
        self,
        sam: BatchedSamPredictor,
        *,
        mask_grid: str = "official",
        foreground_value: int = PERSEG_FOREGROUND_RED,
        attention: bool = True,
        semantic: bool = True,
        guidance: str = "official",
        name: str = "persam",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
    ) -> None:
        super().__init__(name=name, device=device, retriever=retriever, shots=shots)
        if not isinstance(sam, BatchedSamPredictor):
            raise InputError(
                "sam: expected an incontext.backbones.sam.BatchedSamPredictor, got "
                f"{type(sam).__name__}; "
                "build it with incontext.backbones.sam.build_sam (configs/backbone/sam_*.yaml)"
            )
        if mask_grid not in MASK_GRIDS:
            raise InputError(f"mask_grid: expected one of {MASK_GRIDS}, got {mask_grid!r}")
        if guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance: expected one of {GUIDANCE_MODES}, got {guidance!r}")
        if not 0 < int(foreground_value) <= 255:
            raise InputError(f"foreground_value: expected 1..255, got {foreground_value}")
        self.predictor = sam
        self.mask_grid = mask_grid
        self.foreground_value = int(foreground_value)
        self.attention = bool(attention)
        self.semantic = bool(semantic)
        self.guidance = guidance
        self.to(self.device)

    def to(self, device: str | torch.device) -> "PerSAM":
        super().to(device)
        self.predictor.model.to(self.device)
        return self

    # ------------------------------------------------------------------ reference side
    def prepare_binary(self, supports: list[Support]) -> State:
        return self.prepare_references([(s.image, s.mask > 0) for s in supports])

    def prepare_references(self, references: list[tuple[np.ndarray, np.ndarray]]) -> State:
        """State of one concept from (image, mask) pairs.

        Args:
            references: (image (H, W, 3) uint8 RGB, mask (H, W)) pairs; a bool mask is painted with
                ``foreground_value`` for the official grid rule, a uint8 mask is taken as the red
                channel the official code reads (foreground = red > 0).
        """
        feats, masks, locals_, info = [], [], [], []
        for i, (image, mask) in enumerate(references):
            red = self._red(mask, f"references[{i}]")
            emb = self.predictor.embed(image)
            f = emb.features[0]
            local = foreground_features(f, self._grid(red, tuple(f.shape[-2:])))
            feats.append(emb)
            masks.append(red)
            locals_.append(local)
            info.append({"size": list(emb.original_size), "fg_cells": int(local.shape[0])})
        local = torch.cat(locals_)
        target = target_embedding(local, sim_vector=self.sim_vector)
        state: State = {
            "target_raw": target.raw,
            "target_sim": target.sim,
            "local_features": local,
            "sam": self.predictor.name,
            "embed_dim": int(local.shape[1]),
            "sim_vector": self.sim_vector,
            "mask_grid": self.mask_grid,
            "foreground_value": self.foreground_value,
            "attention": self.attention,
            "semantic": self.semantic,
            "guidance": self.guidance,
            "references": info,
        }
        state.update(self._fit(feats, masks, state))
        return state

    def _fit(self, embeddings: list, masks: list[np.ndarray], state: State) -> State:
        return {}

    def _red(self, mask: np.ndarray, name: str) -> np.ndarray:
        m = np.asarray(mask)
        if m.ndim != 2:
            raise InputError(f"{name}: expected a (H, W) mask, got shape {m.shape}")
        if m.dtype == bool:
            return m.astype(np.uint8) * np.uint8(self.foreground_value)
        if m.dtype != np.uint8:
            raise InputError(f"{name}: expected a bool or uint8 mask, got dtype {m.dtype}")
        return m

    def _grid(self, red: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
        model = self.predictor.model
        size = model.image_encoder.img_size
        if self.mask_grid == "area":
            cells = area_mask_grid(red > 0, grid_hw, img_size=size).cells
        else:
            cells = official_mask_grid(
                red,
                grid_hw,
                img_size=size,
                pixel_mean_r=float(model.pixel_mean.reshape(-1)[0]),
                pixel_std_r=float(model.pixel_std.reshape(-1)[0]),
            ).cells
        if not bool(cells.any()):
            # A mask smaller than about one grid cell passes neither rule (the published code then averages an
            # empty set into NaN); keep the cell(s) it covers most, so small objects (and the 16x16 grid of
            # sam_tiny_synthetic) still give a target. Masks that pass a rule are unaffected.
            values = area_mask_grid(red > 0, grid_hw, img_size=size).values
            if float(values.max()) > 0:
                cells = values >= values.max()
        return cells

    # ------------------------------------------------------------------ query side
    def query_embedding(self, query: np.ndarray, cache: dict):
        """The query's SAM embedding, computed once per query and shared through ``cache``."""
        emb = cache.get(CACHE_KEY)
        if emb is None or tuple(emb.original_size) != tuple(query.shape[:2]):
            emb = self.predictor.embed(query)
            cache[CACHE_KEY] = emb
        self.predictor.set_embedding(emb)
        return emb

    def _check_state(self, state: State) -> None:
        dim = int(self.predictor.model.prompt_encoder.embed_dim)
        if int(state["embed_dim"]) != dim or state["sam"] != self.predictor.name:
            raise InputError(
                f"context: prepared with SAM {state['sam']!r} ({state['embed_dim']}-d) but this "
                f"method runs {self.predictor.name!r} ({dim}-d); a concept only works with the SAM "
                "that made it — "
                "prepare it again, or build the method with the same backbone"
            )

    def _cascade(self, state: State):
        return persam_cascade(
            self.predictor,
            target_sim=state["target_sim"],
            target_raw=state["target_raw"],
            attention=bool(state["attention"]),
            semantic=bool(state["semantic"]),
            mode=state["guidance"],
        )

    def segment_binary(self, query: np.ndarray, state: State, *, cache: dict) -> BinaryResult:
        self._check_state(state)
        self.query_embedding(query, cache)
        res = self._cascade(state)
        mask = res.mask.cpu().numpy()
        prob = torch.sigmoid(res.logits.float()).cpu().numpy().astype(np.float32)
        extras = {
            "points_xy": res.points_xy.tolist(),
            "point_labels": res.point_labels.tolist(),
            "predicted_iou": res.score,
            **res.extras,
        }
        return BinaryResult(
            prob=prob, mask=mask, instances=[Instance(mask=mask, score=res.score)], extras=extras
        )


class PerSAMF(PerSAM):
    """PerSAM-F: PerSAM plus two mask-mixing weights fitted on the reference (cached-logit fit).

    Args:
        iterations, lr, eps, weight_decay: the fit (official: 1000 AdamW steps, lr 1e-3, eps 1e-4,
            decay 0.01, cosine schedule); see ``incontext.refine.persam_f``.
        attention, semantic: PerSAM's hooks in the first query pass; off by default like the
            official script.
        Others as :class:`PerSAM`.
    """

    sim_vector = "max_mean"

    def __init__(
        self,
        sam: BatchedSamPredictor,
        *,
        iterations: int = 1000,
        lr: float = 1e-3,
        eps: float = 1e-4,
        weight_decay: float = 0.01,
        mask_grid: str = "official",
        foreground_value: int = PERSEG_FOREGROUND_RED,
        attention: bool = False,
        semantic: bool = False,
        guidance: str = "official",
        name: str = "persam_f",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
    ) -> None:
        super().__init__(
            sam,
            mask_grid=mask_grid,
            foreground_value=foreground_value,
            attention=attention,
            semantic=semantic,
            guidance=guidance,
            name=name,
            device=device,
            retriever=retriever,
            shots=shots,
        )
        if int(iterations) < 1:
            raise InputError(f"iterations: expected a positive count, got {iterations}")
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def training_logits(
        self, embedding, target_sim: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The fit's input for one reference: (3, H, W) multimask logits prompted by the reference's
        location-map argmax (no hooks), and that point (1, 2) (x, y)."""
        self.predictor.set_embedding(embedding)
        model = self.predictor.model
        loc = location_map(
            target_sim,
            embedding.features[0],
            img_size=model.image_encoder.img_size,
            input_size=embedding.input_size,
            original_size=embedding.original_size,
        )
        point, _ = select_points(loc.full)
        out = decode(self.predictor, points_xy=point, point_labels=np.array([1]), multimask=True)
        return out.high_res(), point

    def _fit(self, embeddings: list, masks: list[np.ndarray], state: State) -> State:
        logits, targets, points = [], [], []
        for emb, red in zip(embeddings, masks):
            lg, pt = self.training_logits(emb, state["target_sim"])
            logits.append(lg.reshape(3, -1))
            targets.append(torch.as_tensor(red > 0).reshape(-1))
            points.append(pt.tolist())
        t0 = time.perf_counter()
        fit = fit_mask_weights(
            torch.cat(logits, 1),
            torch.cat(targets),
            iterations=self.iterations,
            lr=self.lr,
            eps=self.eps,
            weight_decay=self.weight_decay,
        )
        return {
            "mask_weights": fit.weights,
            "w": fit.w,
            "fit": {
                "iterations": self.iterations,
                "lr": self.lr,
                "eps": self.eps,
                "weight_decay": self.weight_decay,
                "seconds": time.perf_counter() - t0,
                "train_points_xy": points,
            },
        }

    def _cascade(self, state: State):
        return persam_f_cascade(
            self.predictor,
            target_sim=state["target_sim"],
            mask_weights=state["mask_weights"],
            target_raw=state["target_raw"],
            attention=bool(state["attention"]),
            semantic=bool(state["semantic"]),
            mode=state["guidance"],
        )
