"""Training a promptable SAM with ``train.py``: SAM's interactive recipe on the procedural benchmark's scenes.

The model is the ``segment_anything`` ``Sam`` (``ImageEncoderViT`` / ``PromptEncoder`` / ``MaskDecoder`` with a
``TwoWayTransformer``) built by ``incontext.backbones.sam`` from a ``SamArch``; only its sizes are small.

Data (:class:`SceneSource`): scenes rendered by the benchmark's own ``SceneRenderer`` from the TRAIN split
(1-2 target classes, their distractors and unlabelled clutter). SAM is class-agnostic, so every visible object
is a training instance; the query "mask" handed to the loop is the scene's instance-id map. Held-out (test-split)
classes are only used by :class:`PromptEvalSet`.

Per sample (``SamTask.make_sample``, numpy RNG of the loop): the image resized with the predictor's own
``ResizeLongestSide`` (so training and inference see the same pixels), an optional horizontal flip, up to
``max_instances`` objects and, for each, the first prompt (SAM paper, appendix "Training algorithm"):

* ``point``: one foreground point drawn uniformly from the mask (decoded with 3 multimask outputs);
* ``box``: the mask's box with Gaussian noise of std 10 % of its side, at most 20/1024 of the image side;
* ``coarse``: a degraded copy of the mask (boundary blur/shift, missing and extra blobs, coarse resampling) given
  the way ``refine=sam`` gives another method's mask: box + deepest point of the coarse mask + the mask itself
  as the dense mask prompt. SAM's own recipe has no such start; it is here so ``refine=sam`` works.

Loss (``InteractiveSam.forward``, torch RNG reseeded by the loop per step): ``rounds`` decoder passes per
instance: the first prompt, then ``corrective_points`` rounds that each add one point drawn uniformly from the
error region of the previous prediction (positive on a false negative, negative on a false positive), then
``mask_only_rounds`` passes with no new point; every pass after the first also gets the previous low-res logits
as mask prompt (detached). A single-point prompt returns 3 masks and only the one with the lowest loss is
supervised; any other prompt uses the 4th (single-output) token, as SAM does. Mask loss 20 x focal + 1 x dice
(SAM paper, section 3 "Losses and training"); IoU head: MSE to the true IoU of every returned mask.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide

from incontext.backbones.sam import BatchedSamPredictor, SamArch, _arch_from_mapping, build_sam_model, describe
from incontext.data.base import episode_rng, split_key
from incontext.data.synthetic import SceneRenderer
from incontext.errors import InputError
from incontext.refine.sam_refine import center_point, mask_box, mask_to_prompt_logits
from incontext.train.data import TrainItem

__all__ = [
    "PROMPT_TYPES",
    "SceneSource",
    "SamTask",
    "InteractiveSam",
    "decode_aligned",
    "degrade_mask",
    "PromptEvalSet",
    "evaluate_prompts",
    "sigmoid_focal",
    "dice",
]

PROMPT_TYPES = ("point", "box", "coarse")
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0  # SAM paper, section 3 (20:1 focal:dice; MSE IoU loss)
# Focal loss defaults of Lin et al. 2017 (SAM does not state alpha; SAM 2's training code uses 0.25). The
# experiment config sets alpha = 0.75: trained from scratch on a CPU budget, 0.25 collapses every mask to empty and
# stays there for hundreds of steps (measured, see the experiment config).
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


# ==================================================================================================== data
class SceneSource:
    """Training scenes of the procedural benchmark with their instance-id maps.

    Item ``index`` is a pure function of (seed, split, index): ``TrainItem(query=image, query_mask=instance ids
    (0 = background, 1..K visible objects: targets, distractors and clutter), supports=[])``.

    Args:
        split: the benchmark split whose classes appear ("train" for training).
        sizes: render sizes (square pixels); each item draws one, so models see several scales of the
            benchmark's blur/noise law before the predictor's resize.
        targets: (min, max) number of target classes per scene (distractors and clutter come with them).
        seed: stream seed.
    """

    def __init__(self, split: str = "train", sizes: Sequence[int] = (128,), targets: Sequence[int] = (1, 2),
                 seed: int = 0) -> None:
        if not sizes:
            raise InputError("data.train.sizes: empty; pass at least one render size, e.g. [128]")
        self.renderers = [SceneRenderer(split, int(s)) for s in sizes]
        self.split = split
        self.targets = (int(targets[0]), int(targets[-1]))
        if not 1 <= self.targets[0] <= self.targets[1] <= 5:
            raise InputError(f"data.train.targets: {list(targets)}; pass (min, max) within 1..5")
        self.seed = int(seed)
        self.key = split_key(f"sam_scenes/{split}")

    def episode(self, index: int) -> TrainItem:
        rng = episode_rng(self.seed, self.key, int(index))
        r = self.renderers[int(rng.integers(len(self.renderers)))]
        n = int(rng.integers(self.targets[0], self.targets[1] + 1))
        ids = [r.classes[int(i)].id for i in rng.choice(len(r.classes), n, replace=False)]
        sc = r.scene(rng, ids, max_per_class=3 if n == 1 else 2)
        inst = np.zeros(sc.image.shape[:2], np.uint8)
        for k, g in enumerate(sc.instances):
            inst[g.mask] = k + 1
        return TrainItem(sc.image, inst, [])


# ==================================================================================================== prompts
def degrade_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible coarse prediction of ``mask`` ((H, W) bool): what a few-shot generator might output.

    A random subset of: coarse resampling (blobby outline), Gaussian blur + random threshold (grow/shrink),
    shift of up to 3 % of the side, a missing disc, an extra disc touching or near the object. Never empty.
    """
    h, w = mask.shape
    side = min(h, w)
    m = mask.astype(np.float32)
    if rng.random() < 0.5:  # coarse resampling, as from a low-resolution decoder
        f = float(rng.uniform(4, 12))
        small = cv2.resize(m, (max(2, int(w / f)), max(2, int(h / f))), interpolation=cv2.INTER_AREA)
        m = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    sigma = float(rng.uniform(0.5, 3.0)) * side / 128
    m = cv2.GaussianBlur(m, (0, 0), sigma)
    out = m > float(rng.uniform(0.3, 0.7))
    ys, xs = np.nonzero(mask)
    r_obj = math.sqrt(len(ys) / math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.3 and len(ys):  # a missing part
        i = int(rng.integers(len(ys)))
        r = r_obj * float(rng.uniform(0.3, 0.7))
        out &= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 > r * r
    if rng.random() < 0.3 and len(ys):  # a false-positive blob next to the object
        i = int(rng.integers(len(ys)))
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = r_obj * float(rng.uniform(0.8, 1.8))
        cy, cx = ys[i] + dist * math.sin(ang), xs[i] + dist * math.cos(ang)
        r = r_obj * float(rng.uniform(0.2, 0.6))
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if rng.random() < 0.5:
        dx, dy = (int(v) for v in rng.integers(-int(0.03 * side), int(0.03 * side) + 1, 2))
        out = np.roll(out, (dy, dx), axis=(0, 1))
    if not out.any():
        out = mask.astype(bool).copy()
    return out


# ==================================================================================================== model
def decode_aligned(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for N prompt sets on N (possibly different) image embeddings.

    The package's method repeats ONE image embedding for every prompt set; training decodes the instances of
    a whole batch of images at once, so prompt set i here uses ``image_embeddings[i]``. Same modules, same
    computation (checked against ``predict_masks`` in the tests).

    Args:
        image_embeddings: (N, C, g, g); image_pe: (1, C, g, g); sparse: (N, T, C); dense: (N, C, g, g).

    Returns:
        all mask logits (N, 1 + num_multimask_outputs, 4g, 4g) and IoU predictions (N, 1 + num_multimask_outputs).
    """
    n = sparse.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    src = image_embeddings + dense
    pos = image_pe.expand(n, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + decoder.num_mask_tokens]
    up = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    _, cu, hu, wu = up.shape
    masks = (hyper @ up.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
    return masks, decoder.iou_prediction_head(iou_out)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = FOCAL_ALPHA,
                  gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Per-mask mean sigmoid focal loss; logits/target (..., H, W) -> (...); ``alpha`` < 0: no class weight."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - pt) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss; (..., H, W) -> (...)."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _sample_in(region: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """One (x, y) pixel drawn uniformly from each (N, H, W) bool region (``fallback`` rows where empty)."""
    n, h, w = region.shape
    use = torch.where(region.flatten(1).any(1, keepdim=True), region.flatten(1), fallback.flatten(1))
    weights = use.float() + 1e-12  # an all-empty fallback row draws uniformly
    idx = torch.multinomial(weights, 1).squeeze(1)
    return torch.stack([idx % w, idx // w], dim=1).float()


class InteractiveSam(nn.Module):
    """A ``Sam``'s modules plus SAM's interactive training forward.

    The state dict has exactly ``Sam``'s keys (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so
    checkpoints load into a plain ``Sam`` / ``BatchedSamPredictor``. ``self.sam`` is that ``Sam``.
    """

    def __init__(self, sam: Sam, arch: SamArch, corrective_points: int = 2, mask_only_rounds: int = 1,
                 focal_alpha: float = FOCAL_ALPHA) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), persistent=False)
        self._sam = [sam]  # not a registered child: keys stay Sam's
        self.arch = arch
        self.corrective_points = int(corrective_points)
        self.mask_only_rounds = int(mask_only_rounds)
        self.focal_alpha = float(focal_alpha)

    @property
    def sam(self) -> Sam:
        return self._sam[0]

    def _decode(self, emb, pe, coords, labels, boxes, masks):
        points = (coords, labels) if coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return decode_aligned(self.mask_decoder, emb, pe, sparse, dense)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Interactive training loss of a batch (see the module docstring); returns (loss, logs)."""
        x = (batch["image"] - self.pixel_mean) / self.pixel_std
        feats = self.image_encoder(x)
        b_idx, k_idx = batch["valid"].nonzero(as_tuple=True)
        if len(b_idx) == 0:
            return feats.sum() * 0.0, {}
        # Losses, IoUs and error-region clicks live on the decoder's low-res grid (L = 4 x tokens): the targets
        # are the masks area-resampled to L (soft at boundaries); L x L costs a quarter of the input size.
        gt_in = batch["masks"][b_idx, k_idx].float()  # (N, S, S)
        size = gt_in.shape[-1]
        emb = feats[b_idx]
        low_res = 4 * emb.shape[-1]
        gtf = F.adaptive_avg_pool2d(gt_in[:, None], low_res)[:, 0] if low_res != size else gt_in  # (N, L, L)
        gt = gtf > 0.5
        scale = size / low_res
        ptype = batch["ptype"][b_idx, k_idx]
        pe = self.prompt_encoder.get_dense_pe()
        n_rounds = 1 + self.corrective_points + self.mask_only_rounds
        per_inst = torch.zeros(len(b_idx), device=feats.device)
        # Fixed keys on every rank and step (NaN when a prompt type is absent from the batch).
        logs = {f"iou_{k}_{w}": float("nan") for k in PROMPT_TYPES for w in ("first", "last")}
        for t, kind in enumerate(PROMPT_TYPES):
            sel = (ptype == t).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            g_emb, g_gt, g_gtf = emb[sel], gt[sel], gtf[sel]
            bi, ki = b_idx[sel], k_idx[sel]
            ones = torch.ones(len(sel), 1, device=feats.device)
            coords = labels = boxes = mask_in = None
            if kind == "point":
                coords, labels = batch["point"][bi, ki][:, None], ones
            elif kind == "box":
                boxes = batch["box"][bi, ki]
            else:
                boxes = batch["coarse_box"][bi, ki]
                coords, labels = batch["coarse_point"][bi, ki][:, None], ones
                mask_in = batch["coarse"][bi, ki]
            total = torch.zeros(len(sel), device=feats.device)
            ar = torch.arange(len(sel), device=feats.device)
            for r in range(n_rounds):
                low, iou_pred = self._decode(g_emb, pe, coords, labels, boxes, mask_in)
                multi = r == 0 and kind == "point"
                low, iou_pred = (low[:, 1:], iou_pred[:, 1:]) if multi else (low[:, :1], iou_pred[:, :1])
                tgt = g_gtf[:, None].expand_as(low)
                mask_loss = FOCAL_WEIGHT * sigmoid_focal(low, tgt, self.focal_alpha) + DICE_WEIGHT * dice(low, tgt)
                pred = low.detach() > 0
                true_iou = _iou(pred, g_gt[:, None].expand_as(pred))
                iou_loss = ((iou_pred - true_iou) ** 2).mean(1)
                best = mask_loss.detach().argmin(1)
                total = total + mask_loss[ar, best] + IOU_WEIGHT * iou_loss
                if r in (0, n_rounds - 1):
                    logs[f"iou_{kind}_{'first' if r == 0 else 'last'}"] = float(true_iou[ar, best].mean())
                if r == n_rounds - 1:
                    break
                # The mask passed on (and used to place the next click) is the highest predicted-IoU one.
                keep = iou_pred.detach().argmax(1)
                mask_in = low[ar, keep][:, None].detach()
                if r < self.corrective_points:
                    prev = pred[ar, keep]
                    fn, fp = g_gt & ~prev, prev & ~g_gt
                    cell = _sample_in(fn | fp, g_gt)  # (n, 2) low-res (x, y)
                    xi, yi = cell[:, 0].long(), cell[:, 1].long()
                    lab = torch.where((fn | fp).flatten(1).any(1), fn[ar, yi, xi].float(), ones[:, 0])
                    pt = ((cell + 0.5) * scale - 0.5).clamp(0, size - 1)[:, None]  # input-frame pixels
                    coords = pt if coords is None else torch.cat([coords, pt], 1)
                    labels = lab[:, None] if labels is None else torch.cat([labels, lab[:, None]], 1)
            per_inst[sel] = total / n_rounds
        # Mean over each sample's instances, then over samples (DDP / accumulation average exactly).
        nb = batch["valid"].shape[0]
        sums = torch.zeros(nb, device=feats.device).index_add(0, b_idx, per_inst)
        counts = torch.zeros(nb, device=feats.device).index_add(0, b_idx, torch.ones_like(per_inst))
        has = counts > 0
        loss = (sums[has] / counts[has]).mean()
        return loss, logs


# ==================================================================================================== task
class SamTask:
    """``TrainTask`` of the promptable SAM (see ``incontext.train.task`` and the module docstring).

    Args:
        arch: ``SamArch`` keyword arguments (sizes of the segment_anything modules).
        name: model name written to config.json (the backbone name users load).
        max_instances: objects prompted per image (fewer when the scene has fewer).
        min_area: smallest object (pixels at the model's input size) used for training.
        prompt_probs: probabilities of the first prompt being a point, a box, a coarse mask.
        corrective_points, mask_only_rounds: see ``InteractiveSam``.
        focal_alpha: class weight of the focal loss (-1 = none).
        hflip: probability of a horizontal flip.
        init_checkpoint: folder (config.json + model.safetensors) to start from instead of random init.
    """

    name = "sam"

    def __init__(
        self,
        arch: dict[str, Any],
        name: str = "sam_tiny_synthetic",
        max_instances: int = 6,
        min_area: int = 16,
        prompt_probs: Sequence[float] = (0.45, 0.35, 0.2),
        corrective_points: int = 2,
        mask_only_rounds: int = 1,
        focal_alpha: float = FOCAL_ALPHA,
        hflip: float = 0.5,
        init_checkpoint: str | None = None,
    ) -> None:
        self.arch = _arch_from_mapping(dict(arch))
        self.model_name = name
        self.max_instances = int(max_instances)
        self.min_area = int(min_area)
        p = np.asarray(prompt_probs, np.float64)
        if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
            raise InputError(f"task.prompt_probs: {list(prompt_probs)}; pass 3 non-negative weights "
                             "(point, box, coarse)")
        self.prompt_probs = p / p.sum()
        self.corrective_points = int(corrective_points)
        self.mask_only_rounds = int(mask_only_rounds)
        self.focal_alpha = float(focal_alpha)
        self.hflip = float(hflip)
        self.init_checkpoint = init_checkpoint
        self.size = self.arch.image_size
        self.low_res = 4 * self.arch.grid
        self.transform = ResizeLongestSide(self.size)

    # ------------------------------------------------------------------ TrainTask
    def build_model(self) -> InteractiveSam:
        sam = build_sam_model(self.arch)
        if self.init_checkpoint is not None:
            from incontext.backbones.checkpoint import read_state_dict

            sam.load_state_dict(read_state_dict(Path(self.init_checkpoint) / "model.safetensors",
                                                name="task.init_checkpoint"), strict=True)
        return InteractiveSam(sam, self.arch, self.corrective_points, self.mask_only_rounds,
                              self.focal_alpha).train()

    def make_sample(self, item: TrainItem, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Tensors of one image: ``image`` (3, S, S) float 0..255, ``masks`` (K, S, S) uint8, ``valid`` (K,)
        bool, ``ptype`` (K,) int64 (index into PROMPT_TYPES), ``point`` (K, 2), ``box`` (K, 4) xyxy,
        ``coarse`` (K, 1, L, L) mask-prompt logits, ``coarse_box`` (K, 4), ``coarse_point`` (K, 2); coordinates
        in the S x S model input frame (S = arch.image_size, L = 4 x token grid)."""
        s, k_max = self.size, self.max_instances
        img = item.query
        if img.shape[0] != img.shape[1]:
            raise InputError(f"SAM training images must be square; got {img.shape[:2]}")
        ids = item.query_mask
        x = self.transform.apply_image(img)
        flip = rng.random() < self.hflip
        if flip:
            x = np.ascontiguousarray(x[:, ::-1])
        masks = []
        for v in np.unique(ids):
            if v == 0:
                continue
            m = (ids == v).astype(np.float32)
            if m.shape[0] != s:
                m = cv2.resize(m, (s, s), interpolation=cv2.INTER_AREA if m.shape[0] > s else cv2.INTER_LINEAR)
            m = m > 0.5
            if flip:
                m = np.ascontiguousarray(m[:, ::-1])
            if m.sum() >= self.min_area:
                masks.append(m)
        order = rng.permutation(len(masks))[:k_max]
        out_m = np.zeros((k_max, s, s), np.uint8)
        valid = np.zeros(k_max, bool)
        ptype = np.zeros(k_max, np.int64)
        point = np.zeros((k_max, 2), np.float32)
        box = np.zeros((k_max, 4), np.float32)
        coarse = np.zeros((k_max, 1, self.low_res, self.low_res), np.float32)
        c_box = np.zeros((k_max, 4), np.float32)
        c_point = np.zeros((k_max, 2), np.float32)
        for j, i in enumerate(order):
            m = masks[i]
            out_m[j], valid[j] = m, True
            t = int(rng.choice(3, p=self.prompt_probs))
            ptype[j] = t
            ys, xs = np.nonzero(m)
            if t == 0:
                q = int(rng.integers(len(ys)))
                point[j] = (xs[q], ys[q])
            elif t == 1:
                bx = mask_box(m)
                side = np.array([bx[2] - bx[0], bx[3] - bx[1]] * 2, np.float32)
                noise = np.clip(rng.normal(0, 0.1, 4) * np.maximum(side, 1), -20 / 1024 * s, 20 / 1024 * s)
                bx = np.clip(bx + noise, 0, s - 1)
                box[j] = (min(bx[0], bx[2]), min(bx[1], bx[3]), max(bx[0], bx[2]), max(bx[1], bx[3]))
            else:
                cm = degrade_mask(m, rng)
                coarse[j] = mask_to_prompt_logits(cm, s, self.low_res)
                c_box[j] = mask_box(cm)
                c_point[j] = center_point(cm)
        return {
            "image": torch.from_numpy(x).permute(2, 0, 1).float(),
            "masks": torch.from_numpy(out_m),
            "valid": torch.from_numpy(valid),
            "ptype": torch.from_numpy(ptype),
            "point": torch.from_numpy(point),
            "box": torch.from_numpy(box),
            "coarse": torch.from_numpy(coarse),
            "coarse_box": torch.from_numpy(c_box),
            "coarse_point": torch.from_numpy(c_point),
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch)

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        save_sam_folder(_unwrap(model).sam, self.arch, directory, name=self.model_name)

    def segmenter(self, model: nn.Module, device: torch.device) -> BatchedSamPredictor:
        """The live model as a ``BatchedSamPredictor`` (SAM is promptable, not few-shot: its periodic evaluation
        prompts it, see :func:`evaluate_prompts`)."""
        sam = _unwrap(model).sam
        return BatchedSamPredictor(sam.to(device), name=self.model_name)


def _unwrap(model: nn.Module) -> InteractiveSam:
    return model.module if hasattr(model, "module") else model


def save_sam_folder(sam: Sam, arch: SamArch, directory: str | Path, name: str = "sam_tiny_synthetic",
                    extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` (the ``SamArch``, format tag) + ``model.safetensors`` (Sam's state dict, official
    segment_anything key names) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "segment_anything.Sam", "name": name, "arch": describe(arch), **(extra or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ==================================================================================================== evaluation
@dataclass
class _EvalScene:
    image: np.ndarray
    masks: list[np.ndarray]


class PromptEvalSet:
    """Held-out scenes for prompt evaluation: objects of TEST-split classes (targets and distractors; unlabelled
    clutter is excluded) at least ``min_area_frac`` of the image.

    Args:
        split: "test" (held-out classes).
        size: render size (the benchmark's evaluation default is 224).
        scenes: number of scenes; seed: their seed (scene i is a pure function of (seed, i)).
    """

    def __init__(self, split: str = "test", size: int = 224, scenes: int = 100, seed: int = 0,
                 min_area_frac: float = 0.002) -> None:
        self.renderer = SceneRenderer(split, int(size))
        self.n, self.seed, self.min_area = int(scenes), int(seed), float(min_area_frac) * int(size) ** 2
        self.key = split_key(f"sam_eval/{split}")
        self._cache: dict[int, _EvalScene] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> _EvalScene:
        if i not in self._cache:
            rng = episode_rng(self.seed, self.key, i)
            r = self.renderer
            cid = r.classes[int(rng.integers(len(r.classes)))].id
            sc = r.scene(rng, [cid])
            ms = [g.mask for g in sc.instances if g.role != "clutter" and g.mask.sum() >= self.min_area]
            self._cache[i] = _EvalScene(sc.image, ms)
        return self._cache[i]


def _next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[int, int], int]:
    """Centre of the larger error region (by inscribed-circle radius): positive click on a false negative,
    negative on a false positive (RITM / SAM interactive evaluation)."""
    fn, fp = gt & ~pred, pred & ~gt
    best = None
    for region, label in ((fn, 1), (fp, 0)):
        if region.any():
            d = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
            v = float(d.max())
            if best is None or v > best[0]:
                y, x = np.unravel_index(int(np.argmax(d)), d.shape)
                best = (v, (int(x), int(y)), label)
    if best is None:
        return center_point(gt), 1
    return best[1], best[2]


def prompt_ious(predictor: BatchedSamPredictor, image: np.ndarray, masks: Sequence[np.ndarray],
                clicks: int = 3) -> dict[str, np.ndarray]:
    """IoU of each object's mask from: 1 centre click (highest predicted-IoU of 3 masks, and the oracle best),
    ``clicks`` clicks (each later click at the centre of the larger error region, with the previous low-res
    logits as mask prompt, single-mask output), and the tight box (single mask)."""
    if not masks:
        return {k: np.zeros(0) for k in ("1pt", "1pt_oracle", f"{clicks}pt", "box")}
    predictor.set_image(image)
    gts = np.stack(masks).astype(bool)
    n = len(gts)
    pts = np.array([[center_point(m)] for m in gts], np.float32)
    labels = np.ones((n, 1), np.int64)
    res = predictor.decode(pts, labels, multimask_output=True)
    pm = res.masks.cpu().numpy()
    ious_all = np.array([[_np_iou(pm[i, j], gts[i]) for j in range(pm.shape[1])] for i in range(n)])
    pick = res.iou_pred.argmax(1).cpu().numpy()
    out = {"1pt": ious_all[np.arange(n), pick], "1pt_oracle": ious_all.max(1)}
    prev = pm[np.arange(n), pick]
    low = res.low_res_logits[np.arange(n), pick][:, None]
    for _ in range(clicks - 1):
        new = [_next_click(prev[i], gts[i]) for i in range(n)]
        pts = np.concatenate([pts, np.array([[p] for p, _ in new], np.float32)], 1)
        labels = np.concatenate([labels, np.array([[lab] for _, lab in new], np.int64)], 1)
        res = predictor.decode(pts, labels, mask_input=low, multimask_output=False)
        prev = res.masks[:, 0].cpu().numpy()
        low = res.low_res_logits[:, :1]
    out[f"{clicks}pt"] = np.array([_np_iou(prev[i], gts[i]) for i in range(n)])
    boxes = np.stack([mask_box(m) for m in gts])
    res = predictor.decode(boxes=boxes, multimask_output=False)
    pm = res.masks[:, 0].cpu().numpy()
    out["box"] = np.array([_np_iou(pm[i], gts[i]) for i in range(n)])
    return out


def _np_iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def evaluate_prompts(predictor: BatchedSamPredictor, data: PromptEvalSet, clicks: int = 3,
                     limit: int | None = None) -> dict[str, float]:
    """Mean IoU (x 100) over all held-out objects of ``data`` for each prompt mode (see :func:`prompt_ious`).

    Keys: ``miou_1pt``, ``miou_1pt_oracle``, ``miou_{clicks}pt``, ``miou_box``, ``objects`` and ``miou``
    (= ``miou_1pt``, what ``train.best_metric`` selects by default)."""
    acc: dict[str, list[np.ndarray]] = {}
    n = len(data) if limit is None else min(limit, len(data))
    with torch.inference_mode():
        for i in range(n):
            sc = data[i]
            for k, v in prompt_ious(predictor, sc.image, sc.masks, clicks).items():
                acc.setdefault(k, []).append(v)
    out = {f"miou_{k}": 100.0 * float(np.concatenate(v).mean()) for k, v in acc.items()}
    out["objects"] = float(sum(len(x) for x in acc.get("1pt", [])))
    out["miou"] = out["miou_1pt"]
    return out
