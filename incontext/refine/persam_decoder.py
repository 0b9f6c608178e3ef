"""PerSAM's guided SAM decoding: target-guided attention, target-semantic prompting, cascades.

The official code (ZrrSkywalker/Personalize-SAM @ a7e87245) ships a fork of segment-anything whose
two-way transformer takes two extra arguments. Here the PyPI ``segment_anything`` modules are used
unchanged and the two behaviours are added for the duration of one decoder call by
:func:`persam_guidance`, which installs three documented, temporary hooks on an existing
``MaskDecoder`` and removes them on exit:

1. **semantic prompt** -- a forward pre-hook on each ``TwoWayAttentionBlock`` adds the target
   embedding ``t`` *in place* to the block's ``queries``. Upstream passes the token tensor itself as
   the first block's ``queries`` *and* as every block's ``query_pe``, so the in-place add also
   shifts the query positional encoding, exactly like the fork's ``queries += target_embedding``
   (reference note section 5).
2. **final add** (``mode="official"`` only) -- a forward pre-hook on ``final_attn_token_to_image``
   adds ``t`` to its query once more; with the aliasing above, ``t`` enters the final query twice,
   as in the fork.
3. **target-guided attention** -- the ``cross_attn_token_to_image`` attention of each block runs
   :func:`_guided_attention` (the module's own projections; only the attention weights change):
   ``official``: ``softmax(softmax(QK^T / sqrt(d)) + bias)`` (bias added to probabilities,
   re-normalised); ``hf``: ``softmax(QK^T / sqrt(d) + bias)`` (Hugging Face ``SamModel`` semantics,
   which also skips hook 2). Hook 3 is a per-instance ``forward`` override because upstream's
   ``Attention.forward`` has no seam between its softmax and the value product; the class and every
   other instance are untouched.

With no bias and no target embedding nothing is installed and the call is upstream SAM's, bit for
bit. The hooks mutate the decoder for the duration of the ``with`` block: do not share one decoder
between threads while a guided call runs.

Frames: points and boxes are in original pixels ``(x, y)``; ``low_res`` logits are in SAM's
256 x 256 mask frame (padded input / 4); ``high_res`` logits are at the original image size (SAM's
mask post-processing).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from segment_anything.modeling.mask_decoder import MaskDecoder

from incontext.backbones.sam import BatchedSamPredictor
from incontext.errors import InputError
from incontext.match.location_prior import (
    LocationMap,
    attention_bias,
    location_map,
    select_points,
    upsample_to_original,
)
from incontext.refine.persam_f import mix_logits

__all__ = [
    "GUIDANCE_MODES",
    "persam_guidance",
    "DecoderOutput",
    "guided_decoder",
    "decode",
    "box_from_mask",
    "PassRecord",
    "CascadeResult",
    "persam_cascade",
    "persam_f_cascade",
]

GUIDANCE_MODES = ("official", "hf")


def _guided_attention(attn: torch.nn.Module, bias: torch.Tensor, mode: str):
    """Forward of a segment_anything ``Attention`` with PerSAM's bias on its attention weights."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = attn._separate_heads(attn.q_proj(q), attn.num_heads)
        k = attn._separate_heads(attn.k_proj(k), attn.num_heads)
        v = attn._separate_heads(attn.v_proj(v), attn.num_heads)
        logits = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # B x heads x tokens x keys
        if mode == "official":
            weights = torch.softmax(torch.softmax(logits, dim=-1) + bias, dim=-1)
        else:
            weights = torch.softmax(logits + bias, dim=-1)
        return attn.out_proj(attn._recombine_heads(weights @ v))

    return forward


@contextmanager
def persam_guidance(
    mask_decoder: MaskDecoder,
    *,
    attn_sim: torch.Tensor | None = None,
    target_embedding: torch.Tensor | None = None,
    mode: str = "official",
) -> Iterator[MaskDecoder]:
    """Temporarily add PerSAM's guidance (the three hooks of the module docstring) to a decoder.

    Args:
        mask_decoder: ``sam.mask_decoder`` (PyPI ``segment_anything`` classes).
        attn_sim: (1 or B, 1, 1, gh * gw) bias on the token->image attention weights, or None.
        target_embedding: (1 or B, 1, C) semantic prompt added to the decoder tokens, or None.
        mode: ``"official"`` (fork semantics) or ``"hf"`` (Hugging Face ``SamModel`` semantics).

    Yields:
        the same decoder, guided until the block exits.
    """
    if mode not in GUIDANCE_MODES:
        raise InputError(f"guidance mode: expected one of {GUIDANCE_MODES}, got {mode!r}")
    transformer = mask_decoder.transformer
    handles = []
    overridden = []
    try:
        if target_embedding is not None:
            t = target_embedding

            def add_to_queries(_module, args, kwargs):
                queries = kwargs["queries"] if "queries" in kwargs else args[0]
                queries += t  # in place on purpose: reproduces the fork's aliasing of query_pe
                return None

            for layer in transformer.layers:
                handles.append(layer.register_forward_pre_hook(add_to_queries, with_kwargs=True))
            if mode == "official":

                def add_to_final_query(_module, args, kwargs):
                    if "q" in kwargs:
                        kwargs = dict(kwargs, q=kwargs["q"] + t)
                        return args, kwargs
                    return (args[0] + t,) + tuple(args[1:]), kwargs

                handles.append(
                    transformer.final_attn_token_to_image.register_forward_pre_hook(
                        add_to_final_query, with_kwargs=True
                    )
                )
        if attn_sim is not None:
            for layer in transformer.layers:
                attn = layer.cross_attn_token_to_image
                overridden.append((attn, attn.__dict__.get("forward")))
                attn.forward = _guided_attention(attn, attn_sim, mode)
        yield mask_decoder
    finally:
        for h in handles:
            h.remove()
        for attn, previous in reversed(overridden):
            if previous is None:
                del attn.forward
            else:
                attn.forward = previous


@dataclass
class DecoderOutput:
    """One SAM decoder call on one image.

    Attributes:
        low_res: (m, 256, 256) mask logits in SAM's low-res frame (m = 3 multimask, else 1).
        iou: (m,) predicted IoU.
        frames: (img_size, input_size, original_size) of the image, for :meth:`high_res`.
    """

    low_res: torch.Tensor
    iou: torch.Tensor
    frames: tuple[int, tuple[int, int], tuple[int, int]]

    def high_res(self, index: int | slice = slice(None)) -> torch.Tensor:
        """Logits at the original size (mask = logits > 0): (H, W) for an int index, else (k, H, W).

        Only the requested outputs are upsampled (each channel is resampled independently, so this
        equals slicing SAM's full post-processing up to float rounding, ~1e-7).
        """
        img_size, input_size, original_size = self.frames
        low = self.low_res[index]
        single = low.ndim == 2
        full = upsample_to_original(
            low.reshape(1, -1, *low.shape[-2:]),
            img_size=img_size,
            input_size=input_size,
            original_size=original_size,
        )[0]
        return full[0] if single else full


def guided_decoder(
    mask_decoder: MaskDecoder,
    *,
    attn_sim: torch.Tensor | None = None,
    target_embedding: torch.Tensor | None = None,
    mode: str = "official",
):
    """A drop-in for ``mask_decoder`` (same signature) that runs it under :func:`persam_guidance`.

    Also usable as ``decoder=`` of ``BatchedSamPredictor.decode`` (the backbones' decoder hook).
    """

    def run(**kwargs):
        with persam_guidance(
            mask_decoder, attn_sim=attn_sim, target_embedding=target_embedding, mode=mode
        ) as dec:
            return dec(**kwargs)

    return run


def decode(
    predictor: BatchedSamPredictor,
    *,
    points_xy: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box_xyxy: np.ndarray | None = None,
    mask_input: torch.Tensor | None = None,
    multimask: bool = True,
    attn_sim: torch.Tensor | None = None,
    target_embedding: torch.Tensor | None = None,
    mode: str = "official",
) -> DecoderOutput:
    """Prompt SAM's decoder once on the predictor's current image like ``SamPredictor.predict`` (one
    set, float32 input-frame coordinates), with PerSAM's optional hooks. Post-processing to the
    original size is left to :meth:`DecoderOutput.high_res`, for the outputs actually used.

    Args:
        predictor: backbones' ``BatchedSamPredictor`` with the image set
            (``set_image``/``set_embedding``).
        points_xy: (n, 2) points, (x, y) original pixels; point_labels: (n,) 1 = positive, 0 =
            negative.
        box_xyxy: (4,) box (x0, y0, x1, y1) in original pixels, or None.
        mask_input: (1, 256, 256) low-res logits from a previous call, or None.
        multimask: return the 3 multimask outputs (else the single-output token).
        attn_sim, target_embedding, mode: see :func:`persam_guidance`.
    """
    emb = predictor.current_embedding()
    dev = emb.features.device
    coords = labels = boxes = masks = None
    if points_xy is not None:
        xy = predictor.to_input_frame(np.asarray(points_xy, dtype=np.float64))
        coords = torch.as_tensor(xy, dtype=torch.float, device=dev)[None]
        labels = torch.as_tensor(np.asarray(point_labels), dtype=torch.int, device=dev)[None]
    if box_xyxy is not None:
        box = predictor.transform.apply_boxes(np.asarray(box_xyxy).reshape(1, 4), emb.original_size)
        boxes = torch.as_tensor(box, dtype=torch.float, device=dev)
    if mask_input is not None:
        masks = mask_input.to(dev, torch.float).reshape(1, 1, *mask_input.shape[-2:])
    sparse, dense = predictor.prompt_embeddings(coords, labels, boxes, masks)
    decoder = predictor.model.mask_decoder
    with persam_guidance(decoder, attn_sim=attn_sim, target_embedding=target_embedding, mode=mode):
        low_res, iou = decoder(
            image_embeddings=emb.features,
            image_pe=predictor.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    frames = (
        predictor.model.image_encoder.img_size,
        tuple(emb.input_size),
        tuple(emb.original_size),
    )
    return DecoderOutput(low_res=low_res[0], iou=iou[0], frames=frames)


def box_from_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray | None:
    """Tight box (x0, y0, x1, y1), inclusive pixel extents, of a (H, W) bool mask; None when empty.

    Same as the official ``np.nonzero`` min/max (which raises on an empty mask).
    """
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    y, x = np.nonzero(m)
    if len(x) == 0:
        return None
    return np.array([x.min(), y.min(), x.max(), y.max()], dtype=np.int64)


@dataclass
class PassRecord:
    """Inputs and outputs of one cascade pass (kept only when asked, for parity checks)."""

    points_xy: np.ndarray
    point_labels: np.ndarray
    box_xyxy: np.ndarray | None
    multimask: bool
    output: DecoderOutput
    best_idx: int


@dataclass
class CascadeResult:
    """Final mask of a PerSAM / PerSAM-F cascade on one image.

    Attributes:
        logits: (H, W) original-size logits of the chosen output (mask = logits > 0).
        mask: (H, W) bool.
        score: predicted IoU of the chosen output.
        points_xy, point_labels: the location-prior prompts, (n, 2) (x, y) original pixels, (n,).
        location: the location map of the target on this image.
        passes: per-pass records when ``keep_passes``; otherwise empty.
        extras: named diagnostics (e.g. ``empty_intermediate_mask``).
    """

    logits: torch.Tensor
    mask: torch.Tensor
    score: float
    points_xy: np.ndarray
    point_labels: np.ndarray
    location: LocationMap
    passes: list[PassRecord] = field(default_factory=list)
    extras: dict = field(default_factory=dict)


def _argmax(iou: torch.Tensor) -> int:
    # np.argmax like the official script (first index among equal maxima).
    return int(np.argmax(iou.detach().cpu().numpy()))


def _frame(predictor: BatchedSamPredictor) -> dict:
    emb = predictor.current_embedding()
    return dict(
        features=emb.features[0],
        img_size=predictor.model.image_encoder.img_size,
        input_size=emb.input_size,
        original_size=emb.original_size,
        threshold=predictor.model.mask_threshold,
    )


def _location(target_sim: torch.Tensor, f: dict):
    """The location map of the target vector on the predictor's current image features."""
    return location_map(
        target_sim,
        f["features"],
        img_size=f["img_size"],
        input_size=f["input_size"],
        original_size=f["original_size"],
    )


def _last_pass(predictor, f: dict, loc, points, labels, out2, best2: int, passes: list, extras: dict,
               keep_passes: bool) -> CascadeResult:
    """Pass 3 of both cascades: the points plus the box of pass 2's chosen mask and its low-res logits as mask
    input, multimask, argmax IoU; then the result."""
    box = box_from_mask(out2.high_res(best2) > f["threshold"])
    if box is None:
        extras["empty_intermediate_mask"] = "pass2"  # the official script raises here; we drop the box
    out3 = decode(
        predictor,
        points_xy=points,
        point_labels=labels,
        box_xyxy=box,
        mask_input=out2.low_res[best2 : best2 + 1],
        multimask=True,
    )
    best3 = _argmax(out3.iou)
    if keep_passes:
        passes.append(PassRecord(points, labels, box, True, out3, best3))
    logits = out3.high_res(best3)
    return CascadeResult(
        logits=logits,
        mask=logits > f["threshold"],
        score=float(out3.iou[best3]),
        points_xy=points,
        point_labels=labels,
        location=loc,
        passes=passes,
        extras=extras,
    )


def persam_cascade(
    predictor: BatchedSamPredictor,
    *,
    target_sim: torch.Tensor,
    target_raw: torch.Tensor,
    attention: bool = True,
    semantic: bool = True,
    mode: str = "official",
    keep_passes: bool = False,
) -> CascadeResult:
    """Training-free PerSAM on the predictor's current image (``persam.py``, reference note §3-6).

    Location map -> positive/negative point -> pass 1: both hooks, single output -> pass 2: same
    points with pass 1's low-res logits as mask input, multimask, no hooks, argmax IoU -> pass 3:
    points + box of pass 2's mask + its low-res logits, multimask, argmax IoU.

    Args:
        predictor: ``BatchedSamPredictor`` with the image set (its features are the location map's
            input).
        target_sim: (C,) unit target vector; target_raw: (C,) un-normalised mean feature (semantic
            prompt).
        attention, semantic: use target-guided attention / target-semantic prompting in pass 1.
        mode: hook semantics, ``"official"`` or ``"hf"``.
        keep_passes: keep every pass's inputs and outputs in ``passes``.
    """
    f = _frame(predictor)
    loc = _location(target_sim, f)
    pos, neg = select_points(loc.full)
    points = np.concatenate([pos, neg], axis=0)
    labels = np.array([1, 0], dtype=np.int64)
    bias = attention_bias(loc.full, tuple(f["features"].shape[-2:])) if attention else None
    t = target_raw.reshape(1, 1, -1) if semantic else None
    passes: list[PassRecord] = []
    extras: dict = {}

    out1 = decode(
        predictor,
        points_xy=points,
        point_labels=labels,
        multimask=False,
        attn_sim=bias,
        target_embedding=t,
        mode=mode,
    )
    if keep_passes:
        passes.append(PassRecord(points, labels, None, False, out1, 0))
    out2 = decode(
        predictor,
        points_xy=points,
        point_labels=labels,
        mask_input=out1.low_res[0:1],
        multimask=True,
    )
    best2 = _argmax(out2.iou)
    if keep_passes:
        passes.append(PassRecord(points, labels, None, True, out2, best2))
    return _last_pass(predictor, f, loc, points, labels, out2, best2, passes, extras, keep_passes)


def persam_f_cascade(
    predictor: BatchedSamPredictor,
    *,
    target_sim: torch.Tensor,
    mask_weights: torch.Tensor,
    target_raw: torch.Tensor | None = None,
    attention: bool = False,
    semantic: bool = False,
    mode: str = "official",
    keep_passes: bool = False,
) -> CascadeResult:
    """PerSAM-F inference on the predictor's current image (``persam_f.py`` test loop, note §7).

    Positive point only -> pass 1: multimask, no hooks (official); the three outputs are mixed with
    ``mask_weights`` (original-size logits > 0 give the box, low-res logits the mask input) -> pass
    2: point + box + mixed low-res logits, argmax IoU -> pass 3: point + box of pass 2's mask + its
    logits, argmax IoU.

    Args:
        target_sim: (C,) unit target vector ((max + mean) / 2 variant); mask_weights: (3,) fitted
            weights.
        target_raw, attention, semantic: optional PerSAM hooks in pass 1 (off in the official
            script; issue #42 of the official repository reports they made PerSAM-F worse).
        Others as :func:`persam_cascade`.
    """
    f = _frame(predictor)
    loc = _location(target_sim, f)
    points, _ = select_points(loc.full)
    labels = np.array([1], dtype=np.int64)
    bias = attention_bias(loc.full, tuple(f["features"].shape[-2:])) if attention else None
    t = target_raw.reshape(1, 1, -1) if (semantic and target_raw is not None) else None
    passes: list[PassRecord] = []
    extras: dict = {}

    out1 = decode(
        predictor,
        points_xy=points,
        point_labels=labels,
        multimask=True,
        attn_sim=bias,
        target_embedding=t,
        mode=mode,
    )
    if keep_passes:
        passes.append(PassRecord(points, labels, None, True, out1, -1))
    weights = mask_weights.to(out1.low_res)
    mixed_mask = mix_logits(out1.high_res(), weights) > f["threshold"]
    mixed_low = mix_logits(out1.low_res, weights)
    if keep_passes:
        extras["pass1_weighted_mask"] = mixed_mask
        extras["pass1_weighted_logit_lowres"] = mixed_low
    box = box_from_mask(mixed_mask)
    if box is None:
        extras["empty_intermediate_mask"] = (
            "pass1"  # the official script raises here; we drop the box
        )
    out2 = decode(
        predictor,
        points_xy=points,
        point_labels=labels,
        box_xyxy=box,
        mask_input=mixed_low[None],
        multimask=True,
    )
    best2 = _argmax(out2.iou)
    if keep_passes:
        passes.append(PassRecord(points, labels, box, True, out2, best2))
    return _last_pass(predictor, f, loc, points, labels, out2, best2, passes, extras, keep_passes)
