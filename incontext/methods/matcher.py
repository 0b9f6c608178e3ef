"""``method=matcher_*``: Matcher (Liu et al., "Matcher: Segment Anything with One Shot Using All-Purpose
Feature Matching", ICLR 2024), reproducing the released code (aim-uofa/Matcher @ d59b6c7).

Flow for one class of one query (reference note ``shared/reference/matcher.md``):

1. supports and query resized to ``image_size`` (518) x ``image_size`` (PIL bilinear, aspect not kept; masks
   nearest), DINOv2 pre-norm patch tokens, L2-normalised (:mod:`incontext.match.bidirectional`);
2. forward/reverse Hungarian matching -> matched query points (patch centres, 518 frame);
3. prompt sets: k-means++ centres and their combinations, or random subsets of the points
   (:mod:`incontext.refine.sam_prompts`), seeded with ``seed`` for every query, so a query's result does not
   depend on what was segmented before;
4. SAM (encoder run on the 518 query after the released x255 truncation) decodes every set (+ the dense grid
   for COCO/LVIS), filters, NMS;
5. EMD / purity / coverage per candidate, filters, selection, union (:mod:`incontext.refine.instance_scoring`).

The union (518 frame) is resized back to the query's size for ``prob`` / ``mask``; the selected candidates are
returned as ``instances`` (original size) with their scores. Nothing of the query is kept between calls
except through the per-query ``cache`` (DINOv2 tokens and SAM embedding of the 518 query, shared by classes).

``prepare`` stores the supports' normalised tokens and patch mask in the Context: segmenting many queries
against one support set pays only the query's DINOv2 and SAM encoder passes.

Deliberate departures from the released code (results are unchanged wherever it runs): no candidate surviving
SAM's filters gives an empty mask instead of an exception; k-means++ re-runs are capped (1000); weights load
strictly. The released ``np.int`` cast in the point-in-mask test is kept as plain integer truncation.
"""

from __future__ import annotations

import random
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from incontext.episode import Instance, Support
from incontext.errors import InputError
from incontext.match.bidirectional import MatchResult, bidirectional_match, l2_normalise, patch_foreground
from incontext.pipeline import BinaryResult, Segmenter, State
from incontext.refine.allocator import keep_freed_memory
from incontext.refine.instance_scoring import MetricFilters, Scores, Selection, score_candidates, select, union
from incontext.refine.sam_prompts import (
    Candidates,
    Clustering,
    DecodeSettings,
    cluster_centres,
    generate_candidates,
    sample_prompt_sets,
)

__all__ = ["Matcher", "MatcherRun", "resize_image", "resize_mask", "sam_input"]

DINO_CACHE_KEY = "matcher.dinov2_query_tokens"
SAM_CACHE_KEY = "matcher.sam_embedding_518"


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, PIL bilinear (antialiased), as torchvision ``Resize`` on a
    PIL image does in the released data loaders (aspect ratio not kept)."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) 0/1 (or bool) -> (size, size) bool with ``F.interpolate(mode="nearest")``, as released."""
    t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return (F.interpolate(t, (size, size), mode="nearest")[0, 0] > 0).numpy()


def sam_input(image: np.ndarray) -> np.ndarray:
    """The uint8 image the released code hands SAM: ``ToTensor`` then ``mul(255).byte()`` (truncation)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div(255)
    return x.mul(255).byte().numpy()


class MatcherRun(dict):
    """Every intermediate of one :meth:`Matcher.run` (keys: ``match``, ``clustering``, ``prompt_groups``,
    ``candidates``, ``scores``, ``selection``, ``final_518``, ``timings``); used by the parity tools."""


class Matcher(Segmenter):
    """Matcher as released. Argument names follow the released ``main_oss.py`` options; defaults are its
    argparse defaults (configs set what the published scripts override).

    Args:
        dinov2: ``incontext.backbones.dinov2.DinoFeatures`` (``configs/backbone/dinov2_*.yaml``).
        sam: ``incontext.backbones.sam.BatchedSamPredictor`` (``configs/backbone/sam_*.yaml``) or a bare
            ``segment_anything`` ``Sam``.
        image_size: square working size (518 = 37 DINOv2 patches).
        num_centers: k-means++ centres (``--num_centers``).
        use_box: add the points' box to every prompt set (``--use_box``).
        use_points_or_centers: prompt from all matched points (True) or the k-means centres (False).
        sample_range: (lo, hi) prompt-set sizes (``--sample-range``).
        max_sample_iterations: random draws per size when there are more than 8 points.
        alpha, beta, exp: score = alpha * emd + beta * purity * coverage ** exp.
        emd_filter, purity_filter, coverage_filter: metric filters (0 = off).
        use_score_filter, deep_score_filter, deep_score_norm_filter: the COCO/LVIS selection path.
        topk_scores_threshold: the top-k path's threshold on max-normalised scores.
        num_merging_mask: masks merged at most with one support.
        num_merging_mask_multishot: the same with several supports (the released 5-shot scripts), None = same.
        points_per_side, pred_iou_thresh, stability_score_thresh: SAM's dense grid and its filters.
        use_dense_mask, dense_multimask_output: dense grid on/off and its multimask/output-layer option.
        multimask_output, output_layer, iou_filter, sel_stability_score_thresh: prompted decoding and filters.
        box_nms_thresh: joint box-NMS threshold (1.0 = off).
        seed: seeds ``random`` draws and k-means++ for every query (the released script's per-episode seed).
        decode_chunk: prompt sets per SAM decoder call (speed only; see ``DecodeSettings``).
        emd_workers: threads for the EMD solves (speed only).
        dinov2_attention: ``"official"`` computes attention like the released DINOv2 copy (explicit softmax,
            bit-identical features); ``"fused"`` uses PyTorch's fused kernel (~1e-6 different).
        tune_malloc: keep large freed blocks in the process heap (glibc; process-wide, see
            :mod:`incontext.refine.allocator`): SAM decoding then stops page-faulting its temporaries (speed only).
        name, device, retriever, shots: see ``Segmenter``.
    """

    def __init__(
        self,
        dinov2: Any,
        sam: Any,
        *,
        image_size: int = 518,
        num_centers: int = 8,
        use_box: bool = False,
        use_points_or_centers: bool = False,
        sample_range: Sequence[int] = (4, 6),
        max_sample_iterations: int = 30,
        alpha: float = 1.0,
        beta: float = 0.0,
        exp: float = 0.0,
        emd_filter: float = 0.0,
        purity_filter: float = 0.0,
        coverage_filter: float = 0.0,
        use_score_filter: bool = False,
        deep_score_filter: float = 0.33,
        deep_score_norm_filter: float = 0.1,
        topk_scores_threshold: float = 0.7,
        num_merging_mask: int = 10,
        num_merging_mask_multishot: int | None = None,
        points_per_side: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        use_dense_mask: bool = False,
        dense_multimask_output: int = 0,
        multimask_output: bool = False,
        output_layer: int = 3,
        iou_filter: float = 0.0,
        sel_stability_score_thresh: float = 0.0,
        box_nms_thresh: float = 1.0,
        seed: int = 0,
        decode_chunk: int = 4,
        emd_workers: int = 2,
        dinov2_attention: str = "official",
        tune_malloc: bool = True,
        name: str = "matcher",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
    ) -> None:
        super().__init__(name=name, device=device, retriever=retriever, shots=shots)
        self.dinov2 = dinov2
        self.predictor = sam if hasattr(sam, "model") else None
        self.sam = sam.model if hasattr(sam, "model") else sam
        patch = int(dinov2.patch_size)
        if image_size % patch:
            raise InputError(f"image_size={image_size} is not a multiple of the DINOv2 patch size {patch}; use 518")
        self.image_size = int(image_size)
        self.grid = self.image_size // patch
        if len(sample_range) != 2 or int(sample_range[0]) < 1 or int(sample_range[0]) > int(sample_range[1]):
            raise InputError(f"sample_range={list(sample_range)}; give [lo, hi] with 1 <= lo <= hi, e.g. [4, 6]")
        self.num_centers = int(num_centers)
        self.use_box = bool(use_box)
        self.use_points_or_centers = bool(use_points_or_centers)
        self.sample_range = (int(sample_range[0]), int(sample_range[1]))
        self.max_sample_iterations = int(max_sample_iterations)
        self.alpha, self.beta, self.exp = float(alpha), float(beta), float(exp)
        self.filters = MetricFilters(
            emd=float(emd_filter),
            purity=float(purity_filter),
            coverage=float(coverage_filter),
            use_score_filter=bool(use_score_filter),
            score=float(deep_score_filter),
            score_norm=float(deep_score_norm_filter),
            topk_scores_threshold=float(topk_scores_threshold),
            num_merging_mask=int(num_merging_mask),
        )
        self.num_merging_mask_multishot = (
            None if num_merging_mask_multishot is None else int(num_merging_mask_multishot)
        )
        if int(output_layer) not in range(6):
            raise InputError(f"output_layer={output_layer}; use 0-2 (one SAM output) or 3-5 (outputs from layer-3 on)")
        self.decode = DecodeSettings(
            points_per_side=int(points_per_side),
            use_dense=bool(use_dense_mask),
            dense_multimask=int(dense_multimask_output),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            multimask_output=bool(multimask_output),
            output_layer=int(output_layer),
            iou_filter=float(iou_filter),
            sel_stability_score_thresh=float(sel_stability_score_thresh),
            box_nms_thresh=float(box_nms_thresh),
            decode_chunk=int(decode_chunk),
        )
        self.seed = int(seed)
        self.emd_workers = max(1, int(emd_workers))
        if dinov2_attention not in ("official", "fused"):
            raise InputError(f"dinov2_attention={dinov2_attention!r}; use 'official' or 'fused'")
        self.dinov2_attention = dinov2_attention
        _set_attention(self.dinov2, fused=dinov2_attention == "fused")
        self.tune_malloc = bool(tune_malloc)
        if self.tune_malloc:
            keep_freed_memory()
        self.to(self.device)

    def to(self, device: str | torch.device) -> "Matcher":
        super().to(device)
        self.dinov2.to(self.device)
        self.sam.to(self.device)
        return self

    # ------------------------------------------------------------------ support side
    def support_arrays(self, supports: list[Support]) -> tuple[np.ndarray, np.ndarray]:
        """Supports -> (K, S, S, 3) uint8 images and (K, S, S) bool masks in the working frame."""
        images = np.stack([resize_image(s.image, self.image_size) for s in supports])
        masks = np.stack([resize_mask(s.mask > 0, self.image_size) for s in supports])
        return images, masks

    def encode_supports(self, images: np.ndarray, masks: np.ndarray) -> dict[str, torch.Tensor]:
        """(K, S, S, 3) uint8 + (K, S, S) bool -> ``tokens`` (K*N, C) L2-normalised, ``prenorm`` (K, N, C),
        ``fg`` (K*N,) bool patch mask (any-pixel rule, centre fallback when all masks are empty)."""
        x = self.dinov2.normalize(images)
        prenorm = self.dinov2.patch_tokens(x, batch_size=max(len(images), 1))["prenorm"].float()
        tokens = l2_normalise(prenorm.reshape(-1, prenorm.shape[-1]))
        fg = patch_foreground(torch.from_numpy(masks), int(self.dinov2.patch_size)).reshape(-1)
        return {"tokens": tokens, "prenorm": prenorm, "fg": fg.to(tokens.device)}

    def prepare_binary(self, supports: list[Support]) -> State:
        images, masks = self.support_arrays(supports)
        enc = self.encode_supports(images, masks)
        return {"support_tokens": enc["tokens"], "support_fg": enc["fg"], "shots": len(supports)}

    # ------------------------------------------------------------------ query side
    def query_tokens(self, image518: np.ndarray, cache: dict | None = None) -> torch.Tensor:
        """(S, S, 3) uint8 -> (N, C) L2-normalised query tokens (cached per query)."""
        if cache is not None and DINO_CACHE_KEY in cache:
            return cache[DINO_CACHE_KEY]
        x = self.dinov2.normalize(image518[None])
        tokens = l2_normalise(self.dinov2.patch_tokens(x)["prenorm"][0].float())
        if cache is not None:
            cache[DINO_CACHE_KEY] = tokens
        return tokens

    def sam_embedding(self, image518: np.ndarray, cache: dict | None = None) -> torch.Tensor:
        """(S, S, 3) uint8 -> (1, C, 64, 64) SAM embedding of the released SAM input (cached per query)."""
        if cache is not None and SAM_CACHE_KEY in cache:
            return cache[SAM_CACHE_KEY]
        img = sam_input(image518)
        if self.predictor is not None:
            emb = self.predictor.embed(img).features
        else:
            from segment_anything import SamPredictor

            predictor = SamPredictor(self.sam)
            predictor.set_image(img)
            emb = predictor.features
        if cache is not None:
            cache[SAM_CACHE_KEY] = emb
        return emb

    def merging_limit(self, shots: int) -> MetricFilters:
        """Selection settings for ``shots`` supports (the released 5-shot scripts merge fewer masks)."""
        if shots > 1 and self.num_merging_mask_multishot is not None:
            from dataclasses import replace

            return replace(self.filters, num_merging_mask=self.num_merging_mask_multishot)
        return self.filters

    def run(
        self,
        query518: np.ndarray,
        support_tokens: torch.Tensor,
        support_fg: torch.Tensor,
        *,
        shots: int,
        seed: int,
        cache: dict | None = None,
    ) -> MatcherRun:
        """The whole method in the working frame.

        Args:
            query518: (S, S, 3) uint8 resized query.
            support_tokens: (K*N, C) L2-normalised support tokens; ``support_fg`` (K*N,) bool.
            shots: K (selects ``num_merging_mask``).
            seed: episode seed for the k-means++ generator and the ``random`` draws.
            cache: per-query cache for the encoder outputs.

        Returns:
            :class:`MatcherRun` with every intermediate; ``final_518`` (S, S) bool.
        """
        t = {}
        t0 = time.perf_counter()
        q_tokens = self.query_tokens(query518, cache)
        t["dinov2_query_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedding = self.sam_embedding(query518, cache)
        t["sam_encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        match = bidirectional_match(
            support_tokens.float().cpu(),
            q_tokens.float().cpu(),
            support_fg.cpu(),
            grid=self.grid,
            patch_size=int(self.dinov2.patch_size),
            image_size=(self.image_size, self.image_size),
            use_box=self.use_box,
        )
        clustering, groups = self.prompts(match, seed)
        t["match_prompts_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cands = generate_candidates(
            self.sam, embedding, (self.image_size, self.image_size), groups, match.box, self.decode
        )
        t["sam_decode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores, selection = self.score_and_select(cands, match, shots)
        final = union(cands.masks, selection.selected)
        t["scoring_s"] = time.perf_counter() - t0
        return MatcherRun(
            match=match,
            clustering=clustering,
            prompt_groups=groups,
            candidates=cands,
            scores=scores,
            selection=selection,
            final_518=final.numpy(),
            timings=t,
        )

    def prompts(self, match: MatchResult, seed: int) -> tuple[Clustering | None, list[np.ndarray]]:
        """Sampler input (k-means centres or all points) and the prompt sets, seeded with ``seed``."""
        clustering = None
        points = match.points_xy
        if not self.use_points_or_centers:
            gen = torch.Generator().manual_seed(int(seed))
            clustering = cluster_centres(points, self.num_centers, gen)
            points = clustering.centres
        groups = sample_prompt_sets(
            points, self.sample_range, self.max_sample_iterations, random.Random(int(seed))
        )
        return clustering, groups

    def score_and_select(
        self, cands: Candidates, match: MatchResult, shots: int
    ) -> tuple[Scores | None, Selection]:
        """Instance-level metrics of every candidate and the released selection."""
        if len(cands.masks) == 0:
            empty = np.zeros(0, np.int64)
            return None, Selection(empty, empty, "empty")
        cost_fg = match.cost[torch.from_numpy(match.fg_support_indices)].numpy()
        scores = score_candidates(
            cands.masks,
            cost_fg,
            match.points_xy,
            grid=self.grid,
            alpha=self.alpha,
            beta=self.beta,
            exp=self.exp,
            emd_workers=self.emd_workers,
        )
        selection = select(
            scores.emd, scores.purity, scores.coverage, scores.score, self.merging_limit(shots)
        )
        return scores, selection

    def episode_seed(self, query: np.ndarray) -> int:
        """The seed used for ``query``: ``seed`` (every query starts from the same generator states, like the
        released script reseeded before each episode)."""
        return self.seed

    def segment_binary(self, query: np.ndarray, state: State, *, cache: dict) -> BinaryResult:
        h, w = query.shape[:2]
        q518 = cache.get("matcher.query_518")
        if q518 is None:
            q518 = resize_image(query, self.image_size)
            cache["matcher.query_518"] = q518
        shots = int(state.get("shots", 1))
        out = self.run(
            q518, state["support_tokens"], state["support_fg"], shots=shots,
            seed=self.episode_seed(query), cache=cache,
        )
        final = torch.from_numpy(out["final_518"])
        prob = _to_size(final.float(), (h, w))
        cands, sel = out["candidates"], out["selection"]
        instances = []
        if out["scores"] is not None:
            for i in sel.selected:
                m = _to_size(cands.masks[int(i)].float(), (h, w)) > 0.5
                instances.append(Instance(mask=m.numpy(), score=float(out["scores"].score[int(i)])))
        sx, sy = w / self.image_size, h / self.image_size
        points = out["match"].points_xy.astype(np.float32) * np.array([sx, sy], np.float32)
        extras = {
            "points": points,
            "point_labels": np.ones(len(points), np.int64),
            "n_candidates": int(len(cands.masks)),
            "selection_path": sel.path,
            "selected_candidates": sel.selected,
            "timings": out["timings"],
        }
        if out["scores"] is None:
            extras["warning"] = "no SAM candidate passed the filters; the mask is empty"
        return BinaryResult(prob=prob.numpy(), mask=(prob > 0.5).numpy(), instances=instances, extras=extras)


def _to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(S, S) float map -> (H, W) bilinear (corners not aligned); identity at the same size."""
    if tuple(x.shape) == tuple(size):
        return x
    return F.interpolate(x[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def _set_attention(dinov2: Any, fused: bool) -> None:
    """Choose timm's attention path in every block of the DINOv2 model.

    The released DINOv2 copy computes ``softmax(q * scale @ k^T) @ v`` explicitly; timm's non-fused path is the
    same sequence of operations (bit-identical tokens on the same machine), its fused path is not.
    """
    model = getattr(dinov2, "model", dinov2)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
