"""Matcher's prompt sampler and batched SAM candidate generation.

Two parts, both reproducing aim-uofa/Matcher (``matcher/Matcher.py``, ``matcher/k_means.py`` and the
modified ``segment_anything/automatic_mask_generator.py``) decision for decision:

1. Prompt sets from matched points: k-means++ centres (FSS config) and either every
   k-combination in the released recursive order (<= 8 points) or ``random.sample`` draws.
2. SAM decoding of every prompt set (plus SAM's dense point grid when enabled) on one image
   embedding, SAM's predicted-IoU / stability filters, and one box NMS over all masks.

Frames: prompt points are ``(x, y)`` pixels of the square image handed to SAM (518 x 518 in
Matcher); candidate masks are boolean at that size.

Randomness is explicit: k-means++ takes a ``torch.Generator`` and the draws a ``random.Random``;
seeding both with the same episode seed as the released script's ``torch.manual_seed(s)`` /
``random.seed(s)`` gives the released draws.

Speed without changing results: the released generator decodes 64 prompt sets per call (SAM's
decoder copies the 64x64 image embedding per set and is memory bound at that batch size) and
round-trips every mask through RLE. Here sets are decoded in smaller chunks inside each released
batch (see ``_chunks``), the decoder's prompt-independent first-block work is done once per image
(:mod:`incontext.refine.matcher_decoder`), masks stay boolean (bit-packed until NMS has chosen the
survivors), and masks that fail a filter are dropped before any per-mask work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from incontext.refine.matcher_decoder import decode_masks, supports_sharing

__all__ = [
    "Candidates",
    "DecodeSettings",
    "box_nms",
    "decode_grid",
    "decode_prompt_groups",
    "grid_points",
    "cluster_centres",
    "generate_candidates",
    "kmeans_pp",
    "recursive_combinations",
    "sample_prompt_sets",
]


# --------------------------------------------------------------------------------------------
# 1. Prompt sampling
# --------------------------------------------------------------------------------------------


def kmeans_pp(
    points: np.ndarray, k: int, generator: torch.Generator, max_iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ exactly as ``matcher/k_means.py`` runs it (same torch ops, same RNG calls).

    Args:
        points: (P, 2) point coordinates (any numeric dtype; used as float32).
        k: number of centres (<= P).
        generator: CPU generator consumed like the released code consumes torch's global one:
            one ``randint`` for the first centre, one ``multinomial`` per further centre.
        max_iters: Lloyd iterations at most (stops early when the centres do not change at all).

    Returns:
        centres (k, 2) float32 and the last assignment (P,) int64. An empty cluster keeps its
        centre.
    """
    x = torch.from_numpy(np.asarray(points)).float()
    centres = x[torch.randint(x.size(0), (1,), generator=generator)]
    for _ in range(k - 1):
        distances = torch.cdist(x, centres).min(dim=1).values + 1e-6
        probs = distances**2 / torch.sum(distances**2)
        idx = torch.multinomial(probs, num_samples=1, generator=generator)
        centres = torch.cat([centres, x[idx]], dim=0)
    assignment = torch.zeros(x.size(0), dtype=torch.int64)
    for _ in range(max_iters):
        assignment = torch.argmin(torch.cdist(x, centres), dim=1)
        new_centres = []
        for c in range(k):
            members = assignment == c
            new_centres.append(x[members].mean(dim=0) if members.any() else centres[c])
        new = torch.stack(new_centres, dim=0)
        if bool(torch.isnan(new).any()):
            raise FloatingPointError("k-means++ produced NaN centres")
        if torch.equal(new, centres):
            break
        centres = new
    return centres, assignment


@dataclass
class Clustering:
    """Result of :func:`cluster_centres`: int64 centres, runs needed, last run's raw output."""

    centres: np.ndarray
    runs: int
    centres_float: np.ndarray
    assignment: np.ndarray


def cluster_centres(
    points: np.ndarray,
    num_centers: int,
    generator: torch.Generator,
    max_runs: int = 1000,
) -> Clustering:
    """Matcher's ``clustering``: k-means++ re-run until no cluster is empty, centres truncated.

    ``k = min(num_centers, P)``. The released loop has no bound; ``max_runs`` turns a (practically
    impossible with distinct points) endless loop into an error.
    """
    k = min(num_centers, len(points))
    for run in range(1, max_runs + 1):
        centres, assignment = kmeans_pp(points, k, generator)
        if torch.unique(assignment).shape[0] == k:
            return Clustering(
                centres=centres.numpy().astype(np.int64),
                runs=run,
                centres_float=centres.numpy(),
                assignment=assignment.numpy(),
            )
    raise RuntimeError(f"k-means++ left a cluster empty in {max_runs} runs ({len(points)} points)")


def recursive_combinations(n: int, k: int) -> list[list[int]]:
    """All k-subsets of ``range(n)`` in the released recursive order.

    The order (each subset = a (k-1)-subset of ``range(i)`` followed by ``i``, for i ascending)
    decides which prompt set lands in which decoder batch and the candidate order downstream.
    """
    if k > n:
        return []
    if k == 0:
        return [[]]
    if k == n:
        return [list(range(n))]
    out: list[list[int]] = []
    for i in range(n):
        out.extend(sub + [i] for sub in recursive_combinations(i, k - 1))
    return out


def sample_prompt_sets(
    points: np.ndarray,
    sample_range: tuple[int, int],
    max_iterations: int,
    rng: random.Random,
) -> list[np.ndarray]:
    """Matcher's ``RobustPromptSampler.sample_points``.

    Args:
        points: (n, 2) int64 ``(x, y)`` prompt candidates (k-means centres or matched points).
        sample_range: (lo, hi) subset sizes, clipped to n.
        max_iterations: draws per size when n > 8.
        rng: consumed by one ``rng.sample(range(n), k)`` per draw (sizes ascending), as the
            released code consumes Python's global ``random``.

    Returns:
        One (N_k, k, 2) array per size k (all prompts are positive points). With n <= 8 every
        k-combination is enumerated; otherwise ``max_iterations`` draws (duplicates possible).
    """
    points = np.asarray(points)
    n = len(points)
    lo, hi = int(sample_range[0]), int(sample_range[1])
    groups = []
    for k in range(min(lo, n), min(hi, n) + 1):
        if n > 8:
            index = [rng.sample(range(n), k) for _ in range(max_iterations)]
        else:
            index = recursive_combinations(n, k)
        groups.append(np.take(points, np.asarray(index, dtype=np.int64).reshape(-1, k), axis=0))
    return groups


# --------------------------------------------------------------------------------------------
# 2. SAM candidates
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeSettings:
    """Mask-generator settings (names of the released ``main_oss.py`` arguments in comments).

    Attributes:
        points_per_side: dense grid side (``--points_per_side``).
        use_dense: decode the dense grid (``--use_dense_mask``).
        dense_multimask: ``--dense_multimask_output`` (> 0 turns multimask on for the grid and is
            also the grid's output-layer selector, as in the released builder).
        pred_iou_thresh, stability_score_thresh: grid filters (strict >, >=; 0 disables).
        multimask_output: prompted sets use SAM's 3 outputs (``--multimask_output``).
        output_layer: prompted output selector (``--output_layer``): 0-2 one channel, 3-5 the
            channels from ``layer - 3`` on; only applied when ``multimask_output``.
        iou_filter, sel_stability_score_thresh: prompted filters (strict >, >=; 0 disables).
        stability_offset: SAM's stability offset (1.0 for both branches in Matcher).
        box_nms_thresh: joint box-NMS IoU threshold over grid + prompted masks (1.0 = off).
        points_per_batch: the released batch size; chunks never cross its boundaries.
        decode_chunk: sets decoded per call inside a released batch (speed only; >= 4).
        share_image_work: compute the decoder's prompt-independent first-block work once per call
            (:mod:`incontext.refine.matcher_decoder`; bit-identical, speed only).
    """

    points_per_side: int = 64
    use_dense: bool = False
    dense_multimask: int = 0
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    multimask_output: bool = False
    output_layer: int = 3
    iou_filter: float = 0.0
    sel_stability_score_thresh: float = 0.0
    stability_offset: float = 1.0
    box_nms_thresh: float = 1.0
    points_per_batch: int = 64
    decode_chunk: int = 4
    share_image_work: bool = True


@dataclass
class GroupRecord:
    """Per-output values of one prompt group (or the grid) before filtering: (N, M) arrays."""

    iou_pred: np.ndarray
    stability: np.ndarray
    pass_filters: np.ndarray


@dataclass
class Candidates:
    """SAM candidates after filters and NMS, in NMS output order (decreasing predicted IoU).

    Attributes:
        masks: (N, H, W) bool candidate masks (logit > 0 at the image size).
        iou_pred, stability: (N,) float32.
        boxes: (N, 4) int64 inclusive ``x0, y0, x1, y1``.
        source: (N, 4) int64 (branch 0 grid / 1 prompt set, group or -1, row, output channel).
        pre_nms_source, pre_nms_iou_pred, pre_nms_boxes: the same before NMS (Q rows).
        nms_keep: (N,) indices into the pre-NMS list.
        groups: per prompt group, the unfiltered predicted IoU / stability / pass flags.
        dense: the same for the dense grid (None when off).
        dense_points: (G, 2) float64 grid points in the image frame (None when off).
    """

    masks: torch.Tensor
    iou_pred: np.ndarray
    stability: np.ndarray
    boxes: np.ndarray
    source: np.ndarray
    pre_nms_source: np.ndarray
    pre_nms_iou_pred: np.ndarray
    pre_nms_boxes: np.ndarray
    nms_keep: np.ndarray
    groups: list[GroupRecord] = field(default_factory=list)
    dense: GroupRecord | None = None
    dense_points: np.ndarray | None = None


def _select_outputs(
    logits: torch.Tensor, iou: torch.Tensor, layer: int, enabled: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The released output slicing (``sel_output_layer`` / ``output_layer``); returns channel 0."""
    if not enabled:
        return logits, iou, 0
    if layer in (0, 1, 2):
        if layer >= logits.shape[1]:
            raise ValueError(
                f"output layer {layer} selects a SAM output that a single-mask decode does not "
                "produce; set dense_multimask / output_layer consistently"
            )
        return logits[:, layer : layer + 1], iou[:, layer : layer + 1], layer
    if layer in (3, 4, 5):
        return logits[:, layer - 3 :], iou[:, layer - 3 :], layer - 3
    return logits, iou, 0


def _chunks(n: int, batch: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into the released batches of ``batch``, each into chunks of about ``chunk``.

    SAM's decoder output for a prompt set can depend, at the float-rounding level, on how many sets share
    the call (the GEMM kernels choose their blocking by size): on the machines checked, one- to three-set
    calls rounded differently from larger ones while every size from 4 up agreed with the released 64.
    So chunks never cross a released batch and are never smaller than 4 sets unless the released batch
    itself is.
    """
    spans = []
    chunk = max(4, int(chunk))
    for b0 in range(0, n, batch):
        b1 = min(b0 + batch, n)
        cuts = list(range(b0, b1, chunk)) + [b1]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] < 4:
            del cuts[-2]
        spans.extend(zip(cuts[:-1], cuts[1:]))
    return spans


class _Accumulator:
    """Collects filtered masks (bit-packed to bound memory), scores, boxes and sources."""

    def __init__(self) -> None:
        self.packed: list[np.ndarray] = []
        self.iou: list[torch.Tensor] = []
        self.stability: list[torch.Tensor] = []
        self.boxes: list[torch.Tensor] = []
        self.source: list[np.ndarray] = []

    def add(self, masks: torch.Tensor, iou, stability, boxes, source: np.ndarray) -> None:
        if len(source) == 0:
            return
        self.packed.append(np.packbits(masks.numpy(), axis=-1))
        self.iou.append(iou)
        self.stability.append(stability)
        self.boxes.append(boxes)
        self.source.append(source)


def _decode(
    sam,
    embedding: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor | None,
    multimask: bool,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    share: bool = False,
    image_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SamPredictor.predict_torch call: mask logits at the original size and predicted IoU.

    With ``share`` (and SAM's own decoder classes) the decoder runs through
    :func:`incontext.refine.matcher_decoder.decode_masks`, which computes the image-only part of its first block
    once for all sets (bit-identical outputs); ``image_cache`` (a dict kept for all calls on one embedding) makes
    that once per image."""
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
    if share and supports_sharing(sam.mask_decoder):
        if image_cache is None:
            image_cache = {}
        if "dense_pe" not in image_cache:
            image_cache["dense_pe"] = sam.prompt_encoder.get_dense_pe()
        low_res, iou = decode_masks(
            sam.mask_decoder, embedding, image_cache["dense_pe"], sparse, dense, multimask,
            image_cache=image_cache,
        )
    else:
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    logits = sam.postprocess_masks(low_res, input_size, original_size)
    return logits, iou


def _filter_batch(
    logits: torch.Tensor,
    iou: torch.Tensor,
    iou_thresh: float,
    stability_thresh: float,
    offset: float,
    mask_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM filters on a (B, M, H, W) logit batch; returns stability (B, M) and pass (B, M)."""
    stability = calculate_stability_score(logits, mask_threshold, offset)
    keep = torch.ones_like(iou, dtype=torch.bool)
    if iou_thresh > 0.0:
        keep &= iou > iou_thresh
    if stability_thresh > 0.0:
        keep &= stability >= stability_thresh
    return stability, keep, logits > mask_threshold, iou


@torch.no_grad()
def generate_candidates(
    sam,
    embedding: torch.Tensor,
    image_hw: tuple[int, int],
    prompt_groups: list[np.ndarray],
    box: np.ndarray | None,
    settings: DecodeSettings,
    on_batch: Callable[..., None] | None = None,
) -> Candidates:
    """Decode every prompt set (and the dense grid), filter, and run one box NMS.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (uses ``prompt_encoder``, ``mask_decoder``,
            ``postprocess_masks``, ``mask_threshold``, ``image_encoder.img_size``).
        embedding: (1, C, 64, 64) image embedding of the image (SAM's own preprocessing).
        image_hw: (H, W) of the image given to SAM; masks come out at this size.
        prompt_groups: list of (N_k, k, 2) ``(x, y)`` positive point sets in the image frame.
        box: (4,) ``x0, y0, x1, y1`` box added to every prompted set, or None.
        settings: :class:`DecodeSettings`.
        on_batch: optional observer called once per decoder call with keyword arguments ``branch`` (0 grid,
            1 prompts), ``group``, ``rows`` (the set indices), ``logits`` (B, M, H, W), ``iou`` (B, M),
            ``stability`` (B, M), ``keep`` (B, M) and ``channel0``; parity tests use it to inspect logits
            without keeping them all.

    Returns:
        :class:`Candidates` in the released output order. Empty (0 masks) when nothing survives
        the filters (the released code raises there).
    """
    acc = _Accumulator()
    image_cache: dict = {}  # the decoder's prompt-independent work, once for this embedding
    dense_record = dense_points = None
    if settings.use_dense:
        dense_points = grid_points(settings.points_per_side, image_hw)
        dense_record = decode_grid(
            sam, embedding, image_hw, settings, acc, on_batch=on_batch, image_cache=image_cache
        )
    records = decode_prompt_groups(
        sam, embedding, image_hw, prompt_groups, box, settings, acc, on_batch=on_batch, image_cache=image_cache
    )
    return _nms(acc, settings.box_nms_thresh, image_hw, records, dense_record, dense_points)


def grid_points(points_per_side: int, image_hw: tuple[int, int]) -> np.ndarray:
    """SAM's regular grid (``build_point_grid``) as (n*n, 2) float64 ``(x, y)`` in the image frame."""
    h, w = image_hw
    return build_point_grid(points_per_side) * np.array([[w, h]])


def _frames(sam, image_hw):
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    input_size = transform.get_preprocess_shape(*image_hw, sam.image_encoder.img_size)
    return transform, input_size


def decode_grid(
    sam,
    embedding: torch.Tensor,
    image_hw: tuple[int, int],
    settings: DecodeSettings,
    acc: "_Accumulator",
    *,
    on_batch: Callable[..., None] | None = None,
    batches: list[int] | None = None,
    image_cache: dict | None = None,
) -> GroupRecord:
    """The dense-grid branch: single-point prompts in released batches, the grid filters; survivors go to
    ``acc``. ``batches`` restricts decoding to some released batch indices (tests); records then cover only
    those rows. ``image_cache``: see :func:`_decode` (one per embedding)."""
    image_cache = {} if image_cache is None else image_cache
    h, w = image_hw
    transform, input_size = _frames(sam, image_hw)
    points = grid_points(settings.points_per_side, image_hw)
    multimask = settings.dense_multimask > 0
    spans = _chunks(len(points), settings.points_per_batch, settings.decode_chunk)
    if batches is not None:
        wanted = set(batches)
        spans = [(a, b) for a, b in spans if a // settings.points_per_batch in wanted]
    ious, stabs, passes = [], [], []
    for a, b in spans:
        # The released grid branch keeps the points in float64 until the prompt encoder casts them.
        pts = torch.as_tensor(transform.apply_coords(points[a:b], (h, w)), device=embedding.device)
        labels = torch.ones(pts.shape[0], dtype=torch.int, device=embedding.device)
        logits, iou = _decode(
            sam, embedding, pts[:, None, :], labels[:, None], None, multimask, input_size, (h, w),
            share=settings.share_image_work, image_cache=image_cache,
        )
        # ... and slices its outputs by its own output_layer but with the *prompted* branch's flag.
        logits, iou, ch0 = _select_outputs(logits, iou, settings.dense_multimask, settings.multimask_output)
        _finish_batch(
            acc, logits, iou, settings.pred_iou_thresh, settings.stability_score_thresh, settings,
            float(sam.mask_threshold), branch=0, group=-1, rows=range(a, b), ch0=ch0,
            on_batch=on_batch, out=(ious, stabs, passes),
        )
    return _record(ious, stabs, passes)


def decode_prompt_groups(
    sam,
    embedding: torch.Tensor,
    image_hw: tuple[int, int],
    prompt_groups: list[np.ndarray],
    box: np.ndarray | None,
    settings: DecodeSettings,
    acc: "_Accumulator",
    *,
    on_batch: Callable[..., None] | None = None,
    image_cache: dict | None = None,
) -> list[GroupRecord]:
    """The prompted branch: every group in released batches, the prompted filters; survivors go to ``acc``.
    ``image_cache``: see :func:`_decode` (one per embedding)."""
    image_cache = {} if image_cache is None else image_cache
    h, w = image_hw
    transform, input_size = _frames(sam, image_hw)
    device = embedding.device
    box_t = None
    if box is not None:
        box_t = torch.as_tensor(
            transform.apply_boxes(np.asarray(box), (h, w)), dtype=torch.float, device=device
        ).reshape(1, 4)
    records = []
    for g, sets in enumerate(prompt_groups):
        sets = np.asarray(sets)
        ious, stabs, passes = [], [], []
        for a, b in _chunks(len(sets), settings.points_per_batch, settings.decode_chunk):
            coords = torch.as_tensor(transform.apply_coords(sets[a:b], (h, w)), dtype=torch.float, device=device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
            boxes = None if box_t is None else box_t.expand(coords.shape[0], -1)
            logits, iou = _decode(
                sam, embedding, coords, labels, boxes, settings.multimask_output, input_size, (h, w),
                share=settings.share_image_work, image_cache=image_cache,
            )
            logits, iou, ch0 = _select_outputs(logits, iou, settings.output_layer, settings.multimask_output)
            _finish_batch(
                acc, logits, iou, settings.iou_filter, settings.sel_stability_score_thresh, settings,
                float(sam.mask_threshold), branch=1, group=g, rows=range(a, b), ch0=ch0,
                on_batch=on_batch, out=(ious, stabs, passes),
            )
        records.append(_record(ious, stabs, passes))
    return records


def _record(ious, stabs, passes) -> GroupRecord:
    if not ious:
        return GroupRecord(np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros((0, 1), bool))
    return GroupRecord(np.concatenate(ious), np.concatenate(stabs), np.concatenate(passes))


def _finish_batch(
    acc, logits, iou, iou_thresh, stability_thresh, settings, mask_threshold, *, branch, group, rows, ch0,
    on_batch, out,
) -> None:
    stab, keep, masks, iou = _filter_batch(
        logits, iou, iou_thresh, stability_thresh, settings.stability_offset, mask_threshold
    )
    if on_batch is not None:
        on_batch(branch=branch, group=group, rows=rows, logits=logits, iou=iou, stability=stab, keep=keep,
                 channel0=ch0)
    out[0].append(iou.cpu().numpy())
    out[1].append(stab.cpu().numpy())
    out[2].append(keep.cpu().numpy())
    _add_kept(acc, masks, iou, stab, keep, branch=branch, group=group, row0=rows.start, ch0=ch0)


def _add_kept(acc, masks, iou, stab, keep, *, branch, group, row0, ch0) -> None:
    """Flatten (B, M) outputs row-major (set, channel) like the released MaskData and keep."""
    keep_flat = keep.reshape(-1)
    if not bool(keep_flat.any()):
        return
    b, m = keep.shape
    idx = keep_flat.nonzero()[:, 0]
    kept_masks = masks.reshape(b * m, *masks.shape[2:])[idx].cpu()
    rows = (idx // m).cpu().numpy() + row0
    chans = (idx % m).cpu().numpy() + ch0
    source = np.stack(
        [np.full_like(rows, branch), np.full_like(rows, group), rows, chans], axis=1
    ).astype(np.int64)
    acc.add(
        kept_masks,
        iou.reshape(-1)[idx].cpu(),
        stab.reshape(-1)[idx].cpu(),
        batched_mask_to_box(kept_masks),
        source,
    )


def box_nms(boxes: torch.Tensor, iou_pred: torch.Tensor, threshold: float) -> torch.Tensor:
    """The released joint NMS: ``batched_nms`` with every mask in category 0, scored by predicted IoU.

    Args:
        boxes: (Q, 4) inclusive ``x0, y0, x1, y1`` (any numeric dtype; used as float).
        iou_pred: (Q,) float32 scores, in the pre-NMS order (grid masks first, then prompt groups).
        threshold: box IoU above which the lower-scored box is dropped (1.0 keeps everything).

    Returns:
        (N,) int64 kept indices in decreasing score (the candidate order used by every later stage).
    """
    return batched_nms(
        boxes.float(), iou_pred, torch.zeros(len(boxes), device=boxes.device), iou_threshold=threshold
    )


def _nms(acc, nms_thresh, image_hw, group_records, dense_record, dense_points) -> Candidates:
    h, w = image_hw
    if not acc.source:
        empty = np.zeros((0, 4), dtype=np.int64)
        return Candidates(
            masks=torch.zeros((0, h, w), dtype=torch.bool),
            iou_pred=np.zeros(0, np.float32),
            stability=np.zeros(0, np.float32),
            boxes=empty,
            source=empty,
            pre_nms_source=empty,
            pre_nms_iou_pred=np.zeros(0, np.float32),
            pre_nms_boxes=empty,
            nms_keep=np.zeros(0, np.int64),
            groups=group_records,
            dense=dense_record,
            dense_points=dense_points,
        )
    iou = torch.cat(acc.iou)
    stability = torch.cat(acc.stability)
    boxes = torch.cat(acc.boxes)
    source = np.concatenate(acc.source)
    keep = box_nms(boxes, iou, nms_thresh)
    keep_np = keep.numpy()
    # Unpack only the survivors.
    offsets = np.cumsum([0] + [len(p) for p in acc.packed])
    masks = np.empty((len(keep_np), h, w), dtype=bool)
    for j, i in enumerate(keep_np):
        part = int(np.searchsorted(offsets, i, side="right") - 1)
        masks[j] = np.unpackbits(acc.packed[part][i - offsets[part]], axis=-1, count=w)
    return Candidates(
        masks=torch.from_numpy(masks),
        iou_pred=iou[keep].numpy(),
        stability=stability[keep].numpy(),
        boxes=boxes[keep].numpy().astype(np.int64),
        source=source[keep_np],
        pre_nms_source=source,
        pre_nms_iou_pred=iou.numpy(),
        pre_nms_boxes=boxes.numpy().astype(np.int64),
        nms_keep=keep_np.astype(np.int64),
        groups=group_records,
        dense=dense_record,
        dense_points=dense_points,
    )
