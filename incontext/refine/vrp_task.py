"""Training the VRP-SAM head with ``train.py`` (``experiment=vrp_tiny``): episodes -> tensors, BCE + Dice loss.

Meta-training as the released code (reference note ``vrp_sam.md`` section 4): 1-shot episodes of base (train-split)
classes, the frozen SAM and frozen backbone, only the head learns; loss = BCE-with-logits + Dice on the query mask
at the image size. The released ``train.sh`` trains with mask annotations only; ``annotation_probs`` can mix in the
box and point conditions (the released code has that mixing commented out) so one head serves all three.

Per sample (numpy RNG of the loop): the episode's first support and the query at their rendered size (the model
resizes them to the backbone's / SAM's square inputs, the same path evaluation takes), the support's annotation
drawn from ``annotation_probs`` (points: 1..``max_points`` foreground pixels, as the released training), the
query's 0/1 target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from incontext.errors import InputError
from incontext.refine.vrp import (
    DEFAULT_PEAK_RATIO,
    KSHOT_MODES,
    VRP,
    VrpSam,
    bce_dice_loss,
    save_vrp,
)
from incontext.refine.vrp_features import SamEncoderVrpFeatures
from incontext.refine.vrp_head import (
    ANNOTATIONS,
    VrpHead,
    annotation_mask,
    grid_mask,
    head_config,
)
from incontext.train.data import TrainItem

__all__ = ["VrpTask"]


def _unwrap(model: nn.Module) -> VrpSam:
    return model.module if hasattr(model, "module") else model


class VrpTask:
    """``TrainTask`` of the VRP head (see ``incontext.train.task`` and the module docstring).

    Args:
        sam: weights of the frozen SAM: for ``sam_name`` sam_tiny_synthetic (default) a folder (config.json +
            model.safetensors; None = the shipped ``weights/sam_tiny_synthetic``); for ``sam_name`` sam_vit_h / _l /
            _b the official checkpoint file (None = looked up locally, see ``python -m incontext.weights``).
        sam_name: which SAM (see ``sam``).
        features: frozen backbone: "sam_encoder" (the SAM's own image encoder; offline default) or "resnet50"
            (the paper's dilated ResNet-50, torchvision layout, weights from ``features_weights``).
        features_weights, features_size: the ResNet-50 file and input side (released: 512).
        size: square side every image is resized to in ``make_sample`` (aspect not kept, as the released
            loaders; needed when images differ in size, e.g. COCO-20i); None = keep the rendered size.
        head: ``VrpHeadConfig`` keys except ``mid_channels`` (taken from the backbone) and ``hidden`` (the SAM's
            prompt width).
        mid_blocks: SAM-encoder blocks forming the mid-level features.
        prior: SAM-encoder features of the cosine prior, "neck" or "mid" (see ``SamEncoderVrpFeatures``).
        location_weight: weight of the location loss of a ``prior_click`` head (BCE of its location logits
            against the fraction of each feature cell the query's target covers).
        annotation_probs: probabilities of the mask / box / points condition per sample.
        max_points: point condition draws 1..max_points pixels; point_radius: see ``annotation_mask``.
        eval_annotation: the annotation of the periodic evaluation.
        init_checkpoint: a head folder to start from.
        kshot: the k-shot mode written to config.json ("concat" or "mean", see ``incontext.refine.vrp``); training
            itself is 1-shot, so it only sets what ``method=vrp`` does with several shots by default.
        peaks, peak_ratio, learned_prompts: inference only (written to config.json, used by the periodic
            evaluation): segment up to ``peaks`` location-map peaks and merge the masks, and whether the decoder
            gets the learned prompts with the top click (see ``incontext.refine.vrp``).
        name: recorded in config.json.
    """

    name = "vrp"

    def __init__(
        self,
        sam: str | None = None,
        head: Mapping[str, Any] | None = None,
        sam_name: str = "sam_tiny_synthetic",
        features: str = "sam_encoder",
        features_weights: str | None = None,
        features_size: int = 512,
        size: int | None = None,
        mid_blocks: Sequence[int] = (1, 3),
        prior: str = "neck",
        location_weight: float = 1.0,
        annotation_probs: Sequence[float] = (1.0, 0.0, 0.0),
        max_points: int = 20,
        point_radius: float = 0.02,
        eval_annotation: str = "mask",
        init_checkpoint: str | None = None,
        kshot: str = "concat",
        peaks: int = 1,
        peak_ratio: float = DEFAULT_PEAK_RATIO,
        learned_prompts: bool = True,
        name: str = "vrp_tiny",
    ) -> None:
        self.sam_folder = sam
        self.sam_name = sam_name
        if features not in ("sam_encoder", "resnet50"):
            raise InputError(f"task.features: {features!r}; pass sam_encoder or resnet50")
        self.features = features
        self.features_weights = features_weights
        self.features_size = int(features_size)
        self.size = None if size is None else int(size)
        self.head_kw = dict(head or {})
        for k in ("mid_channels", "hidden"):
            if k in self.head_kw:
                raise InputError(f"task.head.{k}: set by the SAM / backbone; remove it")
        self.mid_blocks = tuple(int(i) for i in mid_blocks)
        self.prior = prior
        self.location_weight = float(location_weight)
        p = np.asarray(annotation_probs, np.float64)
        if p.shape != (len(ANNOTATIONS),) or (p < 0).any() or p.sum() <= 0:
            raise InputError(f"task.annotation_probs: {list(annotation_probs)}; pass {len(ANNOTATIONS)} "
                             f"non-negative weights ({', '.join(ANNOTATIONS)})")
        self.annotation_probs = p / p.sum()
        self.max_points = int(max_points)
        self.point_radius = float(point_radius)
        if eval_annotation not in ANNOTATIONS:
            raise InputError(f"task.eval_annotation: {eval_annotation!r}; pass one of {', '.join(ANNOTATIONS)}")
        self.eval_annotation = eval_annotation
        self.init_checkpoint = init_checkpoint
        if kshot not in KSHOT_MODES:
            raise InputError(f"task.kshot: {kshot!r}; pass one of {', '.join(KSHOT_MODES)}")
        self.kshot = kshot
        self.peaks = int(peaks)
        self.peak_ratio = float(peak_ratio)
        self.learned_prompts = bool(learned_prompts)
        self.model_name = name
        self._sam_name = "sam"

    def _load_sam(self):
        from incontext.backbones.sam import _registry_key, build_sam
        from incontext.backbones.sam_shipped import build_shipped_sam

        if _registry_key(self.sam_name) is not None:
            pred = build_sam(self.sam_name, weights=self.sam_folder, weights_key="task.sam")
        else:
            pred = build_shipped_sam(self.sam_folder, weights_key="task.sam")
        self._sam_name = pred.name
        return pred.model

    def _features(self, sam: nn.Module):
        if self.features == "resnet50":
            from incontext.refine.vrp_features import ResNetVrpFeatures

            return ResNetVrpFeatures(self.features_weights, image_size=self.features_size,
                                     weights_key="task.features_weights")
        return SamEncoderVrpFeatures(sam, self.mid_blocks, self.prior)

    # ------------------------------------------------------------------ TrainTask
    def build_model(self) -> VrpSam:
        sam = self._load_sam()
        if self.init_checkpoint is not None:
            from incontext.refine.vrp import load_vrp

            return load_vrp(self.init_checkpoint, sam, features_weights=self.features_weights,
                            kshot=self.kshot, peaks=self.peaks, peak_ratio=self.peak_ratio,
                            learned_prompts=self.learned_prompts)[0].train()
        feats = self._features(sam)
        cfg = head_config({"mid_channels": feats.mid_channels, "hidden": int(sam.prompt_encoder.embed_dim),
                           **self.head_kw})
        return VrpSam(VrpHead(cfg), sam, feats, kshot=self.kshot, peaks=self.peaks, peak_ratio=self.peak_ratio,
                      learned_prompts=self.learned_prompts).train()

    def make_sample(self, item: TrainItem, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``query`` (3, H, W) and ``support`` (1, 3, H', W') float 0..255, ``annotation`` (1, 1, H', W') 0/1,
        ``target`` (1, H, W) 0/1."""
        if not item.supports:
            raise InputError("VRP training: an episode without supports")
        sup = item.supports[0]
        kind = ANNOTATIONS[int(rng.choice(len(ANNOTATIONS), p=self.annotation_probs))]
        n_points = int(rng.integers(1, self.max_points + 1))
        ann = annotation_mask(sup.mask > 0, kind, rng, n_points, self.point_radius)
        qm = np.asarray(item.query_mask)
        target = ((qm > 0) & (qm != 255)).astype(np.float32)
        q_img, s_img = item.query, sup.image
        if self.size is not None:  # released loaders: square resize, bilinear images, nearest masks
            sq = (self.size, self.size)
            q_img, s_img = (cv2.resize(a, sq, interpolation=cv2.INTER_LINEAR) for a in (q_img, s_img))
            target = cv2.resize(target, sq, interpolation=cv2.INTER_NEAREST)
            ann = cv2.resize(ann, sq, interpolation=cv2.INTER_NEAREST)
        img = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        return {
            "query": img(q_img),
            "support": img(s_img)[None],
            "annotation": torch.from_numpy(ann.astype(np.float32))[None, None],
            "target": torch.from_numpy(target)[None],
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        args = (batch["query"], batch["support"], batch["annotation"])
        target = batch["target"].float()
        if not _unwrap(model).head.config.prior_click:
            logits = model(*args)
            bce, dice = bce_dice_loss(logits.float(), target)
            return bce + dice, {"bce": float(bce.detach()), "dice": float(dice.detach())}
        logits, loc = model(*args, with_location=True)
        bce, dice = bce_dice_loss(logits.float(), target)
        # location map vs the fraction of each feature cell the target covers (where the click should go)
        cover = grid_mask(target, loc.shape[-2:])
        loc_loss = F.binary_cross_entropy_with_logits(loc.float(), cover)
        total = bce + dice + self.location_weight * loc_loss
        return total, {"bce": float(bce.detach()), "dice": float(dice.detach()), "location": float(loc_loss.detach())}

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        save_vrp(_unwrap(model), directory, sam_name=self._sam_name,
                 extra={"name": self.model_name, "sam_folder": str(self.sam_folder) if self.sam_folder else None,
                        "annotation_probs": dict(zip(ANNOTATIONS, self.annotation_probs.tolist()))})

    def segmenter(self, model: nn.Module, device: torch.device) -> VRP:
        from incontext.backbones.sam import BatchedSamPredictor

        m = _unwrap(model)
        return VRP(BatchedSamPredictor(m.sam, name=self._sam_name), model=m, annotation=self.eval_annotation,
                   device=device)
