"""``method=vrp``: VRP-SAM (Sun et al., CVPR 2024) — learned visual reference prompts for a frozen SAM.

A small trained head (``incontext.refine.vrp_head.VrpHead``) turns a support (image + annotation) and the query
into ``num_queries`` prompt embeddings; they are appended to the (empty) sparse prompts of a frozen SAM, whose mask
decoder returns one mask (single-mask output token), as the released code does (reference note ``vrp_sam.md``
section 3): no monkey-patching, the decoder runs on per-sample image embeddings (``decode_aligned``).

Images: resized to a square (aspect not kept, as the released code) at the backbone's and SAM's input sizes, no
padding; the decoder's low-res logits are resized bilinearly to the query's size; mask = logit > 0.

Two options of the head (``VrpHeadConfig``), used by the shipped ``vrp_tiny`` and not in the released code:
``position_values`` (SAM's image PE in the query values) and ``prior_click`` (SAM's own tokens of one positive
click at the arg-max of a learned, prior-initialised location map, placed before the learned prompts; see
:meth:`VrpSam.click`). On the tiny SAM trained here the released layout (50 position-free tokens) did not learn
(issue 12): that decoder was trained with at most a few sparse tokens, and 50 extra tokens swamp it.

k shots: the per-shot prompt embeddings are concatenated into one decoder call (``kshot="concat"``, the released
``predict_mask_nshot``); ``kshot="mean"`` averages the shots' embeddings instead (not in the paper; a
``prior_click`` head then places one click at the maximum of the shots' mean location map).

Several instances (``peaks`` > 1, a ``prior_click`` head; not in the paper): one click segments one object, while
a query may hold several of the class. The location map's further local maxima (``location_peaks``: 3 x 3
non-maximum suppression, probability at least ``peak_ratio`` x the top peak's, at most ``peaks`` in all) each get
one more decoder call with SAM's own click alone, and the masks are merged (union; pixel probability = the
maximum). The first mask is unchanged, so ``peaks: 1`` (the default) is the single-mask behaviour above.
``learned_prompts: false`` (inference only) gives the decoder the top peak's click alone too, without the learned
prompts: the head then only decides where SAM clicks (on the shipped head this scored higher, see its README).

Prepare once, segment many: ``prepare()`` stores each shot's support side (merged support tokens, prototype,
masked high-level features), so a saved concept needs neither the support images nor the backbone pass again.

Weights: ``checkpoint`` = a folder (config.json + model.safetensors) written by ``python train.py
experiment=vrp_tiny``; None = the shipped ``weights/vrp_tiny`` (trained here on the procedural benchmark with the
shipped ``sam_tiny_synthetic``). A head only works with the SAM width and backbone it was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from incontext.backbones.sam import BatchedSamPredictor
from incontext.episode import Instance, Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.pipeline import BinaryResult, Segmenter, State
from incontext.refine.vrp_features import build_vrp_features
from incontext.refine.vrp_head import (
    ANNOTATIONS,
    SupportSide,
    VrpHead,
    annotation_mask,
    config_dict,
    head_config,
    location_peaks,
)

# A further location peak needs this fraction of the top peak's probability (the default of every entry point;
# a config.json written before the key existed loads with it too).
DEFAULT_PEAK_RATIO = 0.7

__all__ = ["DEFAULT_PEAK_RATIO", "KSHOT_MODES", "SHIPPED_NAME", "VRP", "VrpSam", "bce_dice_loss", "load_vrp",
           "save_vrp"]

SHIPPED_NAME = "vrp_tiny"
KSHOT_MODES = ("concat", "mean")
FORMAT = "incontext.vrp_sam"


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released loss on (B, 1, H, W) logits and 0..1 targets: BCE-with-logits (mean over pixels and batch)
    and Dice (sigmoid, +1 smoothing, mean over the batch). Returns (bce, dice)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce, dice.mean()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)


class VrpSam(nn.Module):
    """The VRP head with its frozen SAM and feature backbone.

    Only the head is a registered child, so ``state_dict()`` (and the saved checkpoint) holds the head alone
    (keys ``head.*``); SAM and the backbone are frozen (no gradient, always in eval mode) and follow ``.to()``.

    Args:
        head: the trainable ``VrpHead``.
        sam: a ``segment_anything`` ``Sam`` (frozen here).
        features: a ``vrp_features`` backbone (its ``mid_channels`` must equal the head's).
        kshot: "concat" or "mean" (see the module docstring).
        peaks: at most this many location peaks are segmented at inference (1 = one mask; see the module
            docstring); peak_ratio: a further peak needs this fraction of the top peak's probability.
        learned_prompts: False = at inference the decoder gets SAM's click at the top peak alone (see the module
            docstring); training always uses the learned prompts.
    """

    def __init__(self, head: VrpHead, sam: nn.Module, features: Any, kshot: str = "concat", peaks: int = 1,
                 peak_ratio: float = DEFAULT_PEAK_RATIO, learned_prompts: bool = True) -> None:
        super().__init__()
        if kshot not in KSHOT_MODES:
            raise InputError(f"kshot: {kshot!r}; pass one of {', '.join(KSHOT_MODES)}")
        if int(peaks) < 1 or not 0.0 <= float(peak_ratio) <= 1.0:
            raise InputError(f"VRP: peaks={peaks}, peak_ratio={peak_ratio}; pass peaks >= 1 and a ratio in 0..1")
        if (int(peaks) > 1 or not learned_prompts) and not head.config.prior_click:
            raise InputError("VRP: peaks > 1 and learned_prompts=False need a head with a location map "
                             "(prior_click=True)")
        width = int(sam.prompt_encoder.embed_dim)
        if head.config.hidden != width:
            raise InputError(f"VRP head width {head.config.hidden} != the SAM's prompt width {width}; a head only "
                             "works with the SAM it was trained for (set method.sam to that SAM)")
        if head.config.mid_channels != features.mid_channels:
            raise InputError(f"VRP head expects {head.config.mid_channels} mid-level channels but the backbone "
                             f"{features.kind} gives {features.mid_channels}")
        self.head = head
        self._frozen = [sam.eval().requires_grad_(False), features]
        self.kshot = kshot
        self.peaks = int(peaks)
        self.peak_ratio = float(peak_ratio)
        self.learned_prompts = bool(learned_prompts)

    @property
    def sam(self) -> nn.Module:
        return self._frozen[0]

    @property
    def features(self) -> Any:
        return self._frozen[1]

    def _apply(self, fn, recurse=True):  # .to()/.float() also move the unregistered frozen modules
        super()._apply(fn, recurse)
        self.sam._apply(fn)
        net = getattr(self.features, "net", None)
        if net is not None:
            net._apply(fn)
        return self

    def train(self, mode: bool = True) -> VrpSam:
        super().train(mode)
        self.sam.eval()  # frozen parts stay in eval mode (released code: backbone eval, BN frozen)
        return self

    @property
    def sam_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    # ------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[Any, torch.Tensor | None]:
        """(B, 3, H, W) float RGB 0..255 -> (feature maps, SAM embedding or None), without gradient."""
        with torch.no_grad():
            maps = self.features(_resize(images, self.features.image_size),
                                 None if mask is None else _resize(mask.float(), self.features.image_size))
        return maps, maps.sam_embedding

    def sam_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding of (B, 3, H, W) 0..255 images resized to SAM's square input (no padding)."""
        with torch.no_grad():
            x = (_resize(images, self.sam_size) - self.sam.pixel_mean) / self.sam.pixel_std
            return self.sam.image_encoder(x)

    def support_side(self, images: torch.Tensor, annotations: torch.Tensor) -> SupportSide:
        """One shot for a batch: images (B, 3, H, W) 0..255, annotations (B, 1, H, W) 0/1."""
        maps, _ = self.encode(images, annotations)
        return self.head.support_side(maps.mid, maps.high, annotations)

    def click(self, location: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) location logits -> SAM's own prompt tokens for one positive click at the centre of the
        arg-max cell (the prompt encoder adds its padding point, as for any click without a box): (B, 2, C)."""
        _, _, h, w = location.shape
        return self.click_cells(location.flatten(1).argmax(1), (h, w))

    def click_cells(self, cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N,) row-major cells of an (h, w) grid -> SAM's tokens of one positive click at each cell's centre
        (one prompt set per cell): (N, 2, C)."""
        h, w = grid
        s = float(self.sam_size)
        xy = torch.stack([(cells % w + 0.5) * s / w, (cells // w + 0.5) * s / h], 1).float()[:, None]
        labels = torch.ones(len(cells), 1, dtype=torch.int, device=cells.device)
        sparse, _ = self.sam.prompt_encoder(points=(xy, labels), boxes=None, masks=None)
        return sparse

    def peak_masks(self, embedding: torch.Tensor, location: torch.Tensor) -> torch.Tensor | None:
        """Low-res logits (P, 1, 4g, 4g) of SAM's click alone at each further peak of one (1, 1, h, w) location
        map (the top peak excluded: the head's prompts segment it), or None when there is none (see the module
        docstring)."""
        cells = location_peaks(location, self.peaks, self.peak_ratio)[1:]
        if not cells:
            return None
        clicks = self.click_cells(torch.tensor(cells, device=location.device), tuple(location.shape[-2:]))
        return self.decode(embedding.expand(len(cells), -1, -1, -1), clicks)

    def prompts(self, query_maps: Any, sides: Sequence[SupportSide],
                with_location: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, k * T, C) for "concat" or (B, T, C) for "mean", T = num_queries (+ 2 click tokens for a
        ``prior_click`` head); with ``with_location`` also the shots' mean (B, 1, h, w) location logits."""
        pe = None
        cfg = self.head.config
        if cfg.position_values:  # SAM's image PE on the head's grid (the decoder's positional code)
            pe = self.sam.prompt_encoder.get_dense_pe()
            if tuple(pe.shape[-2:]) != tuple(query_maps.mid.shape[-2:]):
                pe = F.interpolate(pe, query_maps.mid.shape[-2:], mode="bilinear", align_corners=False)
        per_shot, locs = [], []
        for s in sides:
            if cfg.prior_click:
                tok, loc = self.head.query_side(query_maps.mid, query_maps.high, s, pe, with_location=True)
                locs.append(loc)
            else:
                tok = self.head.query_side(query_maps.mid, query_maps.high, s, pe)
            per_shot.append(tok)
        loc = torch.stack(locs).mean(0) if locs else None
        if self.kshot == "mean":
            out = torch.stack(per_shot).mean(0)
            if loc is not None:  # one click at the maximum of the shots' mean location map
                out = torch.cat([self.click(loc.detach()), out], 1)
        elif loc is not None:  # each shot's click before its prompts
            # the click's position is an arg-max (no gradient); ``loc`` learns through the location loss
            out = torch.cat([t for tok, lc in zip(per_shot, locs) for t in (self.click(lc.detach()), tok)], 1)
        else:
            out = torch.cat(per_shot, 1)
        if not with_location:
            return out
        if loc is None:
            raise InputError("VRP: location logits need a head built with prior_click=True")
        return out, loc

    def decode(self, embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """SAM's decoder with ``prompts`` as the sparse tokens (no points/boxes, the "no mask" dense embedding),
        single-mask output: (B, 1, 4g, 4g) low-res logits."""
        from incontext.train.sam_task import decode_aligned

        pe = self.sam.prompt_encoder
        b = prompts.shape[0]
        sparse, dense = pe(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse.expand(b, -1, -1), prompts], 1)
        low, _ = decode_aligned(self.sam.mask_decoder, embedding, pe.get_dense_pe(), sparse,
                                dense.expand(b, -1, -1, -1))
        return low[:, :1]

    # ------------------------------------------------------------------ training forward
    def forward(self, query: torch.Tensor, supports: torch.Tensor, annotations: torch.Tensor,
                with_location: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at the query tensor's size.

        Args:
            query: (B, 3, H, W) float RGB 0..255.
            supports: (B, k, 3, H', W'); annotations: (B, k, 1, H', W') 0/1.
            with_location: also return the location logits of a ``prior_click`` head (for its loss).

        Returns:
            (B, 1, H, W) mask logits (bilinear from the decoder's low-res output) [, (B, 1, h, w) location logits].
        """
        maps, emb = self.encode(query)
        if emb is None:
            emb = self.sam_embedding(query)
        sides = [self.support_side(supports[:, j], annotations[:, j]) for j in range(supports.shape[1])]
        if with_location:
            prompts, loc = self.prompts(maps, sides, with_location=True)
        else:
            prompts, loc = self.prompts(maps, sides), None
        logits = F.interpolate(self.decode(emb, prompts), query.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, loc) if with_location else logits


# ------------------------------------------------------------------------------------------ checkpoints
def save_vrp(model: VrpSam, directory: str | os.PathLike, sam_name: str = "sam",
             extra: Mapping[str, Any] | None = None) -> None:
    """Write ``config.json`` (head sizes, backbone spec, SAM identity) + ``model.safetensors`` (the head)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sam = model.sam
    cfg = {
        "model_type": FORMAT,
        "head": config_dict(model.head.config),
        "features": model.features.spec(),
        "sam": {"name": sam_name, "prompt_embed_dim": int(sam.prompt_encoder.embed_dim),
                "image_size": int(sam.image_encoder.img_size)},
        "kshot": model.kshot,
        "peaks": model.peaks,
        "peak_ratio": model.peak_ratio,
        "learned_prompts": model.learned_prompts,
        **dict(extra or {}),
    }
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def shipped_checkpoint() -> Path:
    """The shipped ``weights/vrp_tiny`` folder (or a user copy in an earlier weights place), or one clear error."""
    from incontext.backbones.weights import search_dirs, shipped

    found = shipped(SHIPPED_NAME)
    if found is None:
        looked = "; ".join(str(d / SHIPPED_NAME) for d in search_dirs())
        raise WeightsNotFoundError(
            f"VRP head {SHIPPED_NAME!r} not found: no config.json + model.safetensors at {looked}. It ships in the "
            f"repository's weights/{SHIPPED_NAME}; rebuild it with `python train.py experiment=vrp_tiny` and set "
            "method.checkpoint=runs/vrp_tiny/checkpoints/best")
    return found


def load_vrp(checkpoint: str | os.PathLike, sam: nn.Module, *, features_weights: str | None = None,
             kshot: str | None = None, peaks: int | None = None, peak_ratio: float | None = None,
             learned_prompts: bool | None = None) -> tuple[VrpSam, dict[str, Any]]:
    """A ``VrpSam`` from a folder written by :func:`save_vrp`, on ``sam`` (frozen). Returns (model, config).
    ``kshot``, ``peaks``, ``peak_ratio``, ``learned_prompts``: None = the config's (a config.json without them:
    concat, 1, 0.7, true)."""
    from incontext.backbones.checkpoint import read_state_dict

    p = Path(checkpoint).expanduser()
    cfg_path, w_path = p / "config.json", p / "model.safetensors"
    missing = [f.name for f in (cfg_path, w_path) if not f.is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"VRP checkpoint: {', '.join(missing)} not found in {str(p)!r}. A checkpoint is a folder with "
            f"config.json + model.safetensors: the repository ships weights/{SHIPPED_NAME}, or train one with "
            "`python train.py experiment=vrp_tiny` (then method.checkpoint=runs/vrp_tiny/checkpoints/best)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != FORMAT:
        raise InputError(f"{cfg_path}: model_type {cfg.get('model_type')!r}; not a VRP head written by "
                         "incontext.refine.vrp.save_vrp")
    want = int(cfg["sam"]["prompt_embed_dim"])
    have = int(sam.prompt_encoder.embed_dim)
    if want != have:
        raise InputError(f"VRP checkpoint {str(p)!r} was trained on SAM {cfg['sam']['name']!r} ({want}-d prompts) "
                         f"but method.sam is {have}-d; set method.sam to that SAM")
    head = VrpHead(head_config(cfg["head"]))
    model = VrpSam(head, sam, build_vrp_features(cfg["features"], sam, features_weights),
                   kshot=kshot or cfg.get("kshot", "concat"),
                   peaks=int(cfg.get("peaks", 1)) if peaks is None else int(peaks),
                   peak_ratio=float(cfg.get("peak_ratio", DEFAULT_PEAK_RATIO) if peak_ratio is None else peak_ratio),
                   learned_prompts=bool(cfg.get("learned_prompts", True) if learned_prompts is None
                                        else learned_prompts))
    model.load_state_dict(read_state_dict(w_path, name="VRP head"), strict=True)
    return model.eval(), cfg


# ------------------------------------------------------------------------------------------ method
def _image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    # torch.tensor copies: the image may be a read-only array (e.g. a cached episode)
    return torch.tensor(np.asarray(image), device=device).permute(2, 0, 1)[None].float()


class VRP(Segmenter):
    """VRP-SAM as a ``Segmenter`` (see the module docstring).

    Args:
        sam: the frozen SAM (``BatchedSamPredictor``; ``configs/backbone/sam_*.yaml``).
        checkpoint: head folder; None = the shipped ``weights/vrp_tiny``.
        model: a live ``VrpSam`` instead of a checkpoint (the trainer's periodic evaluation).
        head: ``VrpHeadConfig`` keys for a randomly initialised head (tests); with ``mid_blocks``, ``prior``.
        mid_blocks: SAM-encoder blocks of a random head's mid-level features.
        prior: features of a random head's cosine prior ("neck" or "mid", see ``SamEncoderVrpFeatures``).
        features_weights: ResNet-50 file for a head trained with the ResNet backbone.
        annotation: how the supports are annotated: "mask", "box" (filled tight box) or "points".
        points, point_radius: the point condition (see ``annotation_mask``; the paper uses 20 points at test).
        seed: seed of the point draws (shot j of a concept uses (seed, j)).
        kshot: "concat" (released) or "mean"; None = the checkpoint's.
        peaks, peak_ratio: segment up to ``peaks`` location peaks (see the module docstring); None = the
            checkpoint's (1 and 0.7 for a config.json without them).
        learned_prompts: False = SAM's clicks alone (see the module docstring); None = the checkpoint's (true
            for a config.json without it).
        threshold: probability threshold of the mask (0.5 = logit 0, as SAM).
        name, device, retriever, shots: see ``Segmenter``.
    """

    def __init__(
        self,
        sam: BatchedSamPredictor,
        *,
        checkpoint: str | os.PathLike | None = None,
        model: VrpSam | None = None,
        head: Mapping[str, Any] | None = None,
        mid_blocks: Sequence[int] = (1, 3),
        prior: str = "neck",
        features_weights: str | None = None,
        annotation: str = "mask",
        points: int = 20,
        point_radius: float = 0.02,
        seed: int = 0,
        kshot: str | None = None,
        peaks: int | None = None,
        peak_ratio: float | None = None,
        learned_prompts: bool | None = None,
        threshold: float = 0.5,
        name: str = "vrp",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
    ) -> None:
        super().__init__(name=name, device=device, retriever=retriever, shots=shots)
        if not isinstance(sam, BatchedSamPredictor):
            raise InputError(f"sam: expected an incontext.backbones.sam.BatchedSamPredictor, got {type(sam).__name__}"
                             "; build it with incontext.backbones.sam.build_sam (configs/backbone/sam_*.yaml)")
        if annotation not in ANNOTATIONS:
            raise InputError(f"annotation: {annotation!r}; pass one of {', '.join(ANNOTATIONS)}")
        if int(points) < 1:
            raise InputError(f"points: {points}; pass at least 1")
        self.predictor = sam
        if model is not None:
            self.model, self.checkpoint = model, "live"
            if peaks is not None or peak_ratio is not None or learned_prompts is not None:
                raise InputError("VRP: peaks / peak_ratio / learned_prompts are set on the live model (VrpSam), "
                                 "not here")
        elif head is not None:
            from incontext.refine.vrp_features import SamEncoderVrpFeatures

            feats = SamEncoderVrpFeatures(sam.model, mid_blocks, prior)
            cfg = head_config({"mid_channels": feats.mid_channels,
                               "hidden": int(sam.model.prompt_encoder.embed_dim), **dict(head)})
            self.model = VrpSam(VrpHead(cfg), sam.model, feats, kshot or "concat", peaks=peaks or 1,
                                peak_ratio=DEFAULT_PEAK_RATIO if peak_ratio is None else peak_ratio,
                                learned_prompts=True if learned_prompts is None else learned_prompts)
            self.checkpoint = "random"
        else:
            path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint()
            self.model, _ = load_vrp(path, sam.model, features_weights=features_weights, kshot=kshot, peaks=peaks,
                                     peak_ratio=peak_ratio, learned_prompts=learned_prompts)
            self.checkpoint = str(path)
        self.annotation = annotation
        self.points = int(points)
        self.point_radius = float(point_radius)
        self.seed = int(seed)
        self.threshold = float(threshold)
        self.to(self.device)

    def to(self, device: str | torch.device) -> VRP:
        super().to(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------ reference side
    def annotate(self, mask: np.ndarray, shot: int) -> np.ndarray:
        """The annotation mask of shot ``shot`` (see ``annotation_mask``)."""
        rng = np.random.default_rng([self.seed, int(shot)])
        return annotation_mask(mask, self.annotation, rng, self.points, self.point_radius)

    def prepare_binary(self, supports: list[Support]) -> State:
        sides: list[SupportSide] = []
        self.model.eval()
        for j, s in enumerate(supports):
            ann = torch.from_numpy(self.annotate(s.mask > 0, j)).to(self.device)[None, None].float()
            with torch.no_grad():
                sides.append(self.model.support_side(_image_tensor(s.image, self.device), ann))
        return {
            "tokens": torch.cat([x.tokens for x in sides]),
            "prototype": torch.cat([x.prototype for x in sides]),
            "high": torch.cat([x.high for x in sides]),
            "annotation": self.annotation,
            "width": int(self.model.head.config.hidden),
            "checkpoint": self.checkpoint,
        }

    # ------------------------------------------------------------------ query side
    def _query(self, query: np.ndarray, cache: dict) -> tuple[Any, torch.Tensor]:
        key = f"vrp:{id(self.model)}"
        hit = cache.get(key)
        if hit is None or hit[0] != query.shape[:2]:
            x = _image_tensor(query, self.device)
            maps, emb = self.model.encode(x)
            if emb is None:
                emb = self.model.sam_embedding(x)
            hit = (query.shape[:2], maps, emb)
            cache[key] = hit
        return hit[1], hit[2]

    def segment_binary(self, query: np.ndarray, state: State, *, cache: dict) -> BinaryResult:
        if int(state["width"]) != int(self.model.head.config.hidden):
            raise InputError(f"context: prepared with a {state['width']}-d VRP head, this one is "
                             f"{self.model.head.config.hidden}-d; prepare the concept again with this method")
        self.model.eval()
        with torch.no_grad():
            maps, emb = self._query(query, cache)
            tok, proto, high = (state[k].to(self.device) for k in ("tokens", "prototype", "high"))
            sides = [SupportSide(tok[j : j + 1], proto[j : j + 1], high[j : j + 1]) for j in range(len(tok))]
            if self.model.peaks > 1 or not self.model.learned_prompts:
                prompts, loc = self.model.prompts(maps, sides, with_location=True)
            else:
                prompts, loc = self.model.prompts(maps, sides), None
            if not self.model.learned_prompts:  # the top peak's click alone
                prompts = self.model.click(loc)
            low = self.model.decode(emb, prompts)
            extra = None if loc is None else self.model.peak_masks(emb, loc)
            if extra is not None:
                low = torch.cat([low, extra])
            probs = torch.sigmoid(F.interpolate(low, query.shape[:2], mode="bilinear", align_corners=False)[:, 0])
        probs = probs.float().cpu().numpy().astype(np.float32)
        instances = []
        for p in probs:  # one instance per decoder call (the top peak's, then the further peaks')
            m = p > self.threshold
            if m.any() or not instances:
                instances.append(Instance(mask=m, score=float(p[m].mean()) if m.any() else 0.0))
        prob = probs.max(0)  # union of the instances' masks
        mask = prob > self.threshold
        return BinaryResult(prob=prob, mask=mask, instances=instances,
                            extras={"shots": len(sides), "annotation": state["annotation"], "peaks": len(probs)})
