"""The VRP-SAM reference encoder ("visual reference prompt" head, Sun et al., CVPR 2024).

Turns (support features, support annotation, query features) into ``num_queries`` prompt embeddings of SAM's
prompt width, which a frozen SAM's mask decoder takes as sparse prompt tokens (``incontext.refine.vrp``).
Structure as the paper and the released ``model/VRP_encoder.py`` + ``model/base/transformer_decoder.py``
describe it (reference note ``vrp_sam.md`` section 2):

* ``reduce``: 1x1 conv (mid-level backbone channels -> C, no bias) + ReLU + Dropout2d(0.5), shared by query and
  support;
* prototype: masked average of the reduced support features (denominator = mask area + 5e-4);
* prior: for every query cell, the largest cosine similarity (eps 1e-7) to any cell of the masked high-level
  support features; no min-max normalisation;
* ``merge``: 1x1 conv (2C + 1 -> C, no bias) + ReLU, shared: support tokens = merge([support, prototype,
  10 * mask]), query tokens = merge([query, prototype, 10 * prior]);
* prompt generator: ``num_queries`` learned embeddings; one decoder layer (post-norm, no FFN):
  cross-attention to the support tokens -> self-attention -> cross-attention to the query tokens ->
  self-attention, each followed by residual + LayerNorm; a DETR sine position embedding is added to the keys only.

All maps are on the backbone's feature grid (h, w); C must equal the SAM's prompt width (256 for the released
SAMs, 64 for the ``sam_tiny_synthetic`` trained here). The support side is split from the query side so a
``Segmenter`` can compute it once in ``prepare()``.

Annotations: :func:`annotation_mask` turns a support's object mask into the "annotation mask" the paper feeds
for the mask, box and point conditions (scribbles are not implemented).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from incontext.errors import InputError

__all__ = [
    "ANNOTATIONS",
    "SupportSide",
    "VrpHead",
    "VrpHeadConfig",
    "annotation_mask",
    "grid_mask",
    "head_config",
    "location_peaks",
    "sine_position_embedding",
]

ANNOTATIONS = ("mask", "box", "points")
MASK_SCALE = 10.0  # the released encoder multiplies the mask / prior channels by 10 before ``merge``
PROTO_EPS = 5e-4  # masked-average denominator offset (released code)
COS_EPS = 1e-7  # cosine-similarity eps of the prior (released code)
LOCATION_BIAS = -3.0  # initial location-logit bias of a prior_click head (log-odds of ~5 % foreground)


@dataclass(frozen=True)
class VrpHeadConfig:
    """Sizes of the reference encoder.

    Attributes:
        mid_channels: channels of the backbone's mid-level features (ResNet-50: layer2 + layer3 = 1536).
        hidden: C, the token width; must equal the SAM's prompt width (released: 256).
        num_queries: learned prompt embeddings (released: 50).
        heads: attention heads (released: 4).
        dropout: Dropout2d after ``reduce`` (released: 0.5).
        position_values: add the positional encoding the caller passes (SAM's image PE) to the *values* of
            the query cross-attention, so a prompt that attends to a query cell carries that cell's position in
            the decoder's own positional code, like a point prompt (not in the released code, whose values are
            position-free; see ``VrpHead.query_side``).
        prior_click: also return a location map (the prior standardised per image times a learned scale, plus a
            learned 1x1 conv of the merged query tokens, zero weights at init so it starts as the prior) whose
            arg-max cell the caller turns into one SAM positive click placed before the learned prompts (not in
            the released code; see ``VrpSam.prompts``).
    """

    mid_channels: int
    hidden: int = 256
    num_queries: int = 50
    heads: int = 4
    dropout: float = 0.5
    position_values: bool = False
    prior_click: bool = False

    def __post_init__(self) -> None:
        if self.hidden % 4 or self.hidden % self.heads:
            raise InputError(f"VRP head: hidden={self.hidden} must be a multiple of 4 and of heads={self.heads}")
        if self.mid_channels < 1 or self.num_queries < 1:
            raise InputError(f"VRP head: mid_channels={self.mid_channels}, num_queries={self.num_queries}; "
                             "both must be >= 1")


def head_config(kw: Mapping[str, Any]) -> VrpHeadConfig:
    """``VrpHeadConfig`` from a mapping (config.json / YAML), with a clear error on unknown keys."""
    unknown = sorted(set(kw) - set(VrpHeadConfig.__dataclass_fields__))
    if unknown:
        raise InputError(f"VRP head config: unknown keys {unknown}; known: "
                         f"{sorted(VrpHeadConfig.__dataclass_fields__)}")
    return VrpHeadConfig(**dict(kw))


def sine_position_embedding(h: int, w: int, dim: int, device: torch.device | None = None,
                            temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding of an (h, w) grid: (h * w, dim) row-major, dim / 2 features per axis
    (y first, then x), positions (1..n) / n * 2 pi."""
    half = dim // 2
    eps = 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * 2 * math.pi
    t = temperature ** (2 * (torch.arange(half, dtype=torch.float32, device=device) // 2) / half)
    py, px = y[:, None] / t, x[:, None] / t  # (h, half), (w, half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    return torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=2).reshape(h * w, dim)


class _Block(nn.Module):
    """Residual attention + LayerNorm (post-norm), as the released decoder layer's sub-blocks."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.norm(q + self.attn(q, k, v, need_weights=False)[0])


@dataclass
class SupportSide:
    """What one shot contributes, computed once per support (the ``prepare()`` state).

    Attributes:
        tokens: (B, C, h, w) merged support tokens (before the position embedding).
        prototype: (B, C) masked average of the reduced support features.
        high: (B, Ch, h, w) high-level support features times the annotation mask (for the prior).
    """

    tokens: torch.Tensor
    prototype: torch.Tensor
    high: torch.Tensor


def grid_mask(annotation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) 0/1 annotation -> (B, 1, h, w) fraction of each feature cell it covers (area resampling).

    The released code resizes with nearest neighbours to a 64 x 64 grid; on the small grids used here (16 x 16)
    nearest sampling drops thin parts and point annotations, so the coverage fraction is kept instead."""
    return F.adaptive_avg_pool2d(annotation.float(), size)


def location_peaks(location: torch.Tensor, k: int, ratio: float, radius: int = 1) -> list[int]:
    """Row-major cells of the strongest local maxima of one (1, 1, h, w) location-logit map, strongest first.

    A cell is a peak if it is the maximum of its (2 ``radius`` + 1)^2 window (non-maximum suppression on the
    grid). The first entry is the map's arg-max (the ``prior_click`` cell); at most ``k`` peaks are returned, and
    a further peak only if its probability (sigmoid) is at least ``ratio`` times the first one's."""
    if location.shape[:2] != (1, 1):
        raise InputError(f"location_peaks: one (1, 1, h, w) map expected, got {tuple(location.shape)}")
    p = torch.sigmoid(location.detach().float())
    window = 2 * int(radius) + 1
    is_peak = p == F.max_pool2d(p, window, stride=1, padding=int(radius))
    flat = p.flatten()
    cand = is_peak.flatten().nonzero()[:, 0]
    cand = cand[flat[cand].argsort(descending=True, stable=True)]
    top = int(location.flatten().argmax())  # the logits' arg-max = the cell ``VrpSam.click`` uses
    cells = [top] + [int(c) for c in cand if int(c) != top and float(flat[c]) >= ratio * float(flat[top])]
    return cells[: max(1, int(k))]


class VrpHead(nn.Module):
    """The trainable part of VRP-SAM (see the module docstring); ``config`` sets the sizes."""

    def __init__(self, config: VrpHeadConfig) -> None:
        super().__init__()
        c = config.hidden
        self.config = config
        self.reduce = nn.Sequential(nn.Conv2d(config.mid_channels, c, 1, bias=False), nn.ReLU(inplace=True),
                                    nn.Dropout2d(config.dropout))
        self.merge = nn.Sequential(nn.Conv2d(2 * c + 1, c, 1, bias=False), nn.ReLU(inplace=True))
        self.queries = nn.Embedding(config.num_queries, c)
        self.support_cross = _Block(c, config.heads)
        self.self_1 = _Block(c, config.heads)
        self.query_cross = _Block(c, config.heads)
        self.self_2 = _Block(c, config.heads)
        if config.prior_click:
            self.locate = nn.Conv2d(c, 1, 1)
            nn.init.zeros_(self.locate.weight)
            # Adam moves a parameter ~lr per step, so the location logits start at a sensible scale: prior
            # z-scores (unit scale) and a bias at the log-odds of a ~5 % foreground
            nn.init.constant_(self.locate.bias, LOCATION_BIAS)
            self.prior_scale = nn.Parameter(torch.ones(()))
        # Released decoder: each attention layer resets its own matrices with xavier-uniform; the learned queries
        # (an nn.Embedding outside those layers) keep PyTorch's N(0, 1) init.
        for blk in (self.support_cross, self.self_1, self.query_cross, self.self_2):
            for p in blk.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def support_side(self, mid: torch.Tensor, high: torch.Tensor, annotation: torch.Tensor) -> SupportSide:
        """Support branch.

        Args:
            mid: (B, Cm, h, w) mid-level support features.
            high: (B, Ch, h', w') high-level support features (already masked by the backbone if it masks
                before its last stage, as the released ResNet path does).
            annotation: (B, 1, H, W) 0/1 (or soft) annotation mask at any resolution.
        """
        m = grid_mask(annotation, mid.shape[-2:])
        feat = self.reduce(mid)
        proto = (feat * m).sum((2, 3)) / (m.sum((2, 3)) + PROTO_EPS)
        tokens = self.merge(torch.cat([feat, proto[..., None, None].expand_as(feat), MASK_SCALE * m], 1))
        mh = grid_mask(annotation, high.shape[-2:])
        return SupportSide(tokens=tokens, prototype=proto, high=high * mh)

    @staticmethod
    def prior(query_high: torch.Tensor, support_high: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, Ch, h', w') query and masked support high-level features -> (B, 1, h, w): per query cell the
        maximum cosine similarity to any support cell (bilinearly resized to the mid-level grid ``size``)."""
        q = query_high.flatten(2)
        s = support_high.flatten(2)
        q = q / (q.norm(dim=1, keepdim=True) + COS_EPS)
        s = s / (s.norm(dim=1, keepdim=True) + COS_EPS)
        sim = torch.einsum("bcq,bcs->bqs", q, s).amax(2)
        p = sim.view(query_high.shape[0], 1, *query_high.shape[-2:])
        if tuple(p.shape[-2:]) != tuple(size):
            p = F.interpolate(p, size, mode="bilinear", align_corners=True)
        return p

    def query_side(self, mid: torch.Tensor, high: torch.Tensor, support: SupportSide,
                   value_pe: torch.Tensor | None = None,
                   with_location: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for one shot.

        Args:
            mid: (B, Cm, h, w) mid-level query features; high: (B, Ch, h', w') high-level query features.
            support: that shot's :class:`SupportSide` (batch B, or 1 to broadcast over the queries).
            value_pe: (1, C, h, w) positional encoding added to the query values when
                ``config.position_values`` (required then): with SAM's image PE, a prompt attending to one cell
                becomes a "soft click" there, which the frozen decoder already understands; with position-free
                values (released) the prompts can only say *what* to segment, not *where*.
            with_location: also return the (B, 1, h, w) location logits (``config.prior_click`` heads).

        Returns:
            (B, num_queries, C) prompt embeddings (SAM sparse-prompt tokens) [, location logits].
        """
        b = mid.shape[0]
        feat = self.reduce(mid)
        h, w = feat.shape[-2:]
        prior = self.prior(high, support.high.expand(b, -1, -1, -1), (h, w))
        proto = support.prototype.expand(b, -1)
        q_tokens = self.merge(torch.cat([feat, proto[..., None, None].expand_as(feat), MASK_SCALE * prior], 1))
        s_tokens = support.tokens.expand(b, -1, -1, -1)
        pe = sine_position_embedding(h, w, self.config.hidden, feat.device)[None]
        sk, qk = s_tokens.flatten(2).transpose(1, 2), q_tokens.flatten(2).transpose(1, 2)
        x = self.queries.weight[None].expand(b, -1, -1)
        x = self.support_cross(x, sk + pe, sk)
        x = self.self_1(x, x, x)
        qv = qk
        if self.config.position_values:
            if value_pe is None:
                raise InputError("VRP head: position_values=True needs value_pe (the SAM's image PE)")
            qv = qk + value_pe.flatten(2).transpose(1, 2)
        x = self.query_cross(x, qk + pe, qv)
        x = self.self_2(x, x, x)
        if not with_location:
            return x
        if not self.config.prior_click:
            raise InputError("VRP head: with_location needs a head built with prior_click=True")
        z = (prior - prior.mean((2, 3), keepdim=True)) / (prior.std((2, 3), keepdim=True) + COS_EPS)
        return x, self.prior_scale * z + self.locate(q_tokens)

    def forward(self, query_mid: torch.Tensor, query_high: torch.Tensor, support_mid: torch.Tensor,
                support_high: torch.Tensor, annotation: torch.Tensor,
                value_pe: torch.Tensor | None = None) -> torch.Tensor:
        """One shot end to end: (B, num_queries, C) prompt embeddings."""
        return self.query_side(query_mid, query_high, self.support_side(support_mid, support_high, annotation),
                               value_pe)


# ------------------------------------------------------------------------------------------ annotations
def annotation_mask(mask: np.ndarray, kind: str, rng: np.random.Generator | None = None, points: int = 20,
                    point_radius: float = 0.02) -> np.ndarray:
    """The support annotation the encoder sees, from the object's (H, W) mask: (H, W) uint8 0/1.

    * ``mask``: the mask itself;
    * ``box``: its filled tight box (the paper's box condition);
    * ``points``: ``points`` foreground pixels drawn uniformly (the paper: 20 at test, 1..20 in training), each
      painted as a disc of radius ``point_radius`` x the shorter side (at least 1 px), clipped to the object,
      so a click survives the resampling to the feature grid.

    An empty mask gives an empty annotation."""
    m = np.asarray(mask) > 0
    if kind not in ANNOTATIONS:
        raise InputError(f"annotation: {kind!r}; pass one of {', '.join(ANNOTATIONS)}")
    out = np.zeros(m.shape, np.uint8)
    if not m.any() or kind == "mask":
        return m.astype(np.uint8)
    ys, xs = np.nonzero(m)
    if kind == "box":
        out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
        return out
    if rng is None:
        raise InputError("annotation=points needs a random generator (rng) to draw the points")
    idx = rng.choice(len(ys), size=min(int(points), len(ys)), replace=False)
    r = max(1, round(point_radius * min(m.shape)))
    for i in idx:
        cv2.circle(out, (int(xs[i]), int(ys[i])), r, 1, thickness=-1)
    return out & m.astype(np.uint8)  # a click marker never claims pixels outside the object


def config_dict(config: VrpHeadConfig) -> dict[str, Any]:
    return asdict(config)
