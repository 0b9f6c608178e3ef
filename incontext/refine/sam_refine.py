"""``refine=sam``: prompt SAM with an earlier stage's mask (box + points + the mask itself) to fix its outline.

Any generator or matcher leaves a coarse answer in the pipeline's ``Carry`` (``mask``, else ``prob`` or
``prior`` above ``threshold``). Each connected part of it that is large enough becomes one SAM prompt set:

* the part's bounding box (xyxy, inclusive pixel coordinates, as SAM's training boxes);
* one positive point at the part's centre (the pixel farthest from its boundary);
* negative points the earlier stage left in ``carry.points`` with label 0 (e.g. PerSAM's), shared by all parts;
* the part as SAM's dense mask prompt (:func:`mask_to_prompt_logits`: SAM's input frame at 4x the token grid,
  logits of +-``MASK_PROMPT_LOGIT``).

All parts are decoded in one batched call on one image embedding (cached per query and SAM, so several classes
pay one encoder pass), single-mask output (``multimask``: SAM's 3 answers, the best by predicted IoU x agreement). A SAM answer replaces its part only if SAM's predicted IoU is at least
``min_pred_iou`` and it overlaps the part with IoU >= ``min_agreement`` (otherwise SAM found another object and
the part is kept as it was). Parts smaller than ``min_area`` are kept unchanged, or dropped with ``drop_small``.

The shipped ``sam_tiny_synthetic`` saw exactly these prompts in training (``incontext.train.sam_task``, first
prompt "coarse"); a released SAM was trained on its own logits as mask prompt, so ``mask_prompt=false`` may suit
it better.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from incontext.episode import Instance, Support
from incontext.errors import InputError

__all__ = ["MASK_PROMPT_LOGIT", "SamRefine", "center_point", "mask_box", "mask_to_prompt_logits", "CACHE_PREFIX"]

# A binary mask given as SAM's dense prompt becomes logits of +-MASK_PROMPT_LOGIT (0 on the boundary after area
# resampling). The same constant is used to train sam_tiny_synthetic and by this stage.
MASK_PROMPT_LOGIT = 8.0
CACHE_PREFIX = "sam_embedding"


def center_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from its boundary (the image border counts as boundary): the
    "centre" click of interactive-segmentation evaluation (SAM paper, appendix D.1, following RITM)."""
    m = np.pad(np.asarray(mask).astype(np.uint8), 1)
    d = cv2.distanceTransform(m, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(4,) float32 xyxy box of a non-empty mask, inclusive pixel coordinates."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise InputError("mask_box: the mask is empty")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def mask_to_prompt_logits(mask: np.ndarray, img_size: int, low_res: int) -> np.ndarray:
    """A binary mask at original size -> SAM's dense mask prompt, (1, low_res, low_res) float32.

    Same frame as SAM's low-res logits: ``ResizeLongestSide(img_size)``, zero padding (bottom/right) to
    ``img_size`` squared, area resampling to ``low_res`` (= 4 x SAM's token grid); probabilities p become
    logits (2p - 1) * MASK_PROMPT_LOGIT.
    """
    m = np.asarray(mask).astype(np.float32)
    if m.ndim != 2:
        raise InputError(f"mask_to_prompt_logits: mask has shape {m.shape}; expected (H, W)")
    h, w = m.shape
    nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, img_size)
    if (nh, nw) != (h, w):
        m = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR)
    pad = np.zeros((img_size, img_size), np.float32)
    pad[:nh, :nw] = m
    low = cv2.resize(pad, (low_res, low_res), interpolation=cv2.INTER_AREA) if low_res != img_size else pad
    return ((2.0 * low - 1.0) * MASK_PROMPT_LOGIT)[None].astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


class SamRefine:
    """The ``refine`` stage ``sam`` (see the module docstring).

    Args:
        sam: a ``BatchedSamPredictor`` (``configs/backbone/sam_*.yaml``; the offline default is the shipped
            ``sam_tiny_synthetic``).
        threshold: probability above which ``prob``/``prior`` pixels form the coarse mask (when no earlier stage
            set ``mask``).
        min_area: parts smaller than this fraction of the image are not prompted.
        max_parts: at most this many parts (largest first) are prompted.
        box, point, mask_prompt: which prompts to give SAM for each part.
        negatives: also pass the earlier stage's label-0 points.
        min_pred_iou: SAM answers with a lower predicted IoU are rejected.
        min_agreement: SAM answers overlapping their part with a lower IoU are rejected.
        drop_small: drop parts below ``min_area`` instead of keeping them.
        multimask: ask SAM for its 3 answers per part and keep the one with the highest predicted IoU x IoU with
            the part (default: SAM's single-mask answer).
        device: where SAM runs.
    """

    def __init__(
        self,
        sam: Any,
        threshold: float = 0.5,
        min_area: float = 0.0005,
        max_parts: int = 8,
        box: bool = True,
        point: bool = True,
        mask_prompt: bool = True,
        negatives: bool = True,
        min_pred_iou: float = 0.0,
        min_agreement: float = 0.3,
        drop_small: bool = False,
        multimask: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if not (box or point or mask_prompt):
            raise InputError("refine=sam: box, point and mask_prompt are all false; enable at least one prompt")
        if int(max_parts) < 1:
            raise InputError(f"refine.max_parts: {max_parts}; pass 1 or more")
        self.sam = sam
        self.threshold = float(threshold)
        self.min_area = float(min_area)
        self.max_parts = int(max_parts)
        self.box, self.point, self.mask_prompt, self.negatives = bool(box), bool(point), bool(mask_prompt), \
            bool(negatives)
        self.min_pred_iou = float(min_pred_iou)
        self.min_agreement = float(min_agreement)
        self.drop_small = bool(drop_small)
        self.multimask = bool(multimask)
        self.to(device)

    def to(self, device: str | torch.device) -> "SamRefine":
        self.device = torch.device(device)
        self.sam.model.to(self.device)
        return self

    def prepare(self, supports: list[Support]) -> dict:
        return {}  # nothing support-specific: the prompts come from the query's coarse mask

    # ------------------------------------------------------------------ helpers
    def _coarse(self, carry: Any) -> np.ndarray:
        h, w = carry.query.shape[:2]
        if carry.mask is not None:
            m = carry.mask
        elif carry.prob is not None:
            m = carry.prob > self.threshold
        elif carry.prior is not None:
            from incontext.pipeline import resize_map

            m = resize_map(carry.prior.float(), (h, w)) > self.threshold
        else:
            raise InputError("refine=sam needs an earlier match or generate stage that leaves a mask, prob or prior")
        m = m.detach().cpu().numpy().astype(bool) if isinstance(m, torch.Tensor) else np.asarray(m, bool)
        if m.shape != (h, w):
            raise AssertionError(f"refine=sam: coarse mask {m.shape}, query {(h, w)}")
        return m

    def _embedding(self, query: np.ndarray, cache: dict) -> None:
        key = f"{CACHE_PREFIX}@{getattr(self.sam, 'name', 'sam')}"
        if key not in cache:
            cache[key] = self.sam.embed(query)
        else:
            self.sam.set_embedding(cache[key])

    def parts(self, mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Split ``mask`` into (prompted parts, largest first, at most ``max_parts``; small parts)."""
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        min_px = self.min_area * mask.size
        order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        big = [i for i in order if stats[i, cv2.CC_STAT_AREA] >= min_px][: self.max_parts]
        small = [i for i in order if i not in big]
        return [lab == i for i in big], [lab == i for i in small]

    # ------------------------------------------------------------------ Stage
    def __call__(self, carry: Any, state: dict) -> None:
        """Set ``carry.mask`` (refined), ``carry.prob`` and ``carry.instances`` (one per part);
        ``carry.extras["refine_sam"]`` records what SAM was asked and what was kept."""
        coarse = self._coarse(carry)
        h, w = coarse.shape
        prob = carry.prob.detach().float().cpu().numpy() if carry.prob is not None else coarse.astype(np.float32)
        parts, small = self.parts(coarse)
        info: dict[str, Any] = {"sam": getattr(self.sam, "name", "sam"), "parts": len(parts), "accepted": 0,
                                "pred_iou": [], "agreement": []}
        out = np.zeros((h, w), bool)
        sam_prob = np.zeros((h, w), np.float32)
        instances: list[Instance] = []
        if parts:
            self._embedding(carry.query, carry.cache)
            res = self._decode(parts, carry)
            pick = torch.zeros(len(parts), dtype=torch.long)
            if self.multimask:  # of SAM's 3 answers, the one with the best predicted IoU x agreement with its part
                cand = (res.logits > self.sam.model.mask_threshold).cpu().numpy()
                score = np.array([[_iou(c, part) for c in cs] for cs, part in zip(cand, parts)])
                pick = torch.from_numpy((score * res.iou_pred.float().cpu().numpy()).argmax(1))
            rows = torch.arange(len(parts))
            logits = res.logits[rows, pick].float().cpu()
            probs = torch.sigmoid(logits).numpy()
            logits = logits.numpy()
            ious = res.iou_pred[rows, pick].float().cpu().numpy()
            for part, lg, pr, piou in zip(parts, logits, probs, ious):
                sam_mask = lg > self.sam.model.mask_threshold
                agree = _iou(sam_mask, part)
                info["pred_iou"].append(float(piou))
                info["agreement"].append(agree)
                if sam_mask.any() and piou >= self.min_pred_iou and agree >= self.min_agreement:
                    info["accepted"] += 1
                    out |= sam_mask
                    sam_prob = np.maximum(sam_prob, pr)
                    instances.append(Instance(mask=sam_mask, score=float(piou), label=1))
                else:
                    out |= part
                    instances.append(Instance(mask=part, score=float(prob[part].mean()), label=1))
        if not self.drop_small:
            for part in small:
                out |= part
                instances.append(Instance(mask=part, score=float(prob[part].mean()), label=1))
        # Inside the final mask the probability is at least SAM's, outside at most SAM's (0 where SAM answered
        # nothing), so merging classes by probability agrees with the refined masks.
        new_prob = np.where(out, np.maximum(prob, sam_prob), np.minimum(prob, sam_prob))
        carry.mask = torch.from_numpy(out)
        carry.prob = torch.from_numpy(new_prob.astype(np.float32))
        carry.instances = instances
        carry.extras["refine_sam"] = info

    def _decode(self, parts: list[np.ndarray], carry: Any):
        n = len(parts)
        points = labels = boxes = mask_input = None
        pts: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        if self.point:
            pts.append(np.array([[center_point(p)] for p in parts], np.float32))
            labs.append(np.ones((n, 1), np.int64))
        if self.negatives and carry.points is not None and carry.point_labels is not None:
            cp = carry.points.detach().cpu().numpy().reshape(-1, 2)
            cl = carry.point_labels.detach().cpu().numpy().reshape(-1)
            neg = cp[cl == 0].astype(np.float32)
            if len(neg):
                pts.append(np.repeat(neg[None], n, 0))
                labs.append(np.zeros((n, len(neg)), np.int64))
        if pts:
            points, labels = np.concatenate(pts, 1), np.concatenate(labs, 1)
        if self.box:
            boxes = np.stack([mask_box(p) for p in parts])
        if self.mask_prompt:
            enc = self.sam.model.image_encoder.img_size
            low = 4 * self.sam.model.prompt_encoder.image_embedding_size[0]
            mask_input = np.stack([mask_to_prompt_logits(p, enc, low) for p in parts])
        return self.sam.decode(points, labels, boxes=boxes, mask_input=mask_input,
                               multimask_output=self.multimask, return_logits=True)
