"""Training the painter with ``train.py``: episode -> in-context-coloured canvas sample, and its MIM loss.

Per sample (reference note ``seggpt_painter.md`` sections 3-4):

* one support of the episode is the prompt; the query's mask is the target;
* SegGPT's in-context colouring: every class gets a fresh random colour, the same on prompt and target, so the
  model must read the colour from the prompt instead of memorising class -> colour (background black unless
  ``random_background`` > 0);
* Painter's masking of the colour stream: with probability ``p_lower_half`` exactly the lower (target) half,
  otherwise BEiT-style random blocks covering exactly half of all patches (so some target patches stay visible
  and some prompt patches must be painted). Painter uses p = 0.1; on a tiny CPU budget the evaluated task
  (lower half) deserves more weight — the experiment config sets it;
* Painter's random-resized crop (scale range ``crop_scale`` of the shorter side, here a square window kept
  around a random pixel of the object so the target stays in view), drawn independently for prompt and query;
  it enlarges small objects for part of the samples;
* optional horizontal flip of the whole pair (same flip for prompt and query).

Matching prior (models whose config has ``match_prior``; a deviation from SegGPT): the training-free
``PrototypeMatch`` runs on the (cropped) prompt and query at their rendered size, and its foreground probability,
drawn as a grey soft mask, fills the query's colour cell instead of mask tokens; the loss still covers exactly
that cell. From scratch, the tiny SegGPT on the 960 train classes never left the constant-prior plateau within a
CPU-hour (issue 8); the diffusion generator, given the same prior as an input, learned in minutes.

Matching read-out loss (``match_weight`` > 0; a deviation from SegGPT, which learns from the painting loss
alone): the image-stream tokens after block ``match_layer`` are read as Matcher reads DINOv2 patches — each query
token's cosine to its nearest foreground and nearest background support token, ``MATCH_SCALE`` x their
difference as a logit — and a BCE pulls that read-out to the query's true token mask. It gives the early blocks
the class-discriminative, cross-cell-comparable features that the painting loss alone did not find within a
CPU budget (the diffusion generator's auxiliary prior loss plays the same role). It adds no parameters.

Loss: smooth-L1 (beta = ``config.beta``, 0.01 in SegGPT) between painted and true colours in model space, mean
over the masked pixels of each sample, then mean over samples (equal to transformers' SegGptLoss when every
sample masks the same number of patches, which this masking guarantees, and batch-size independent so DDP and
gradient accumulation average exactly).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from incontext.episode import Support
from incontext.generate import canvas
from incontext.generate.painter import (
    PainterStage,
    build_seggpt,
    cell_size,
    load_seggpt,
    load_seggpt_config,
    prior_matcher,
    seggpt_config,
)
from incontext.train.data import TrainItem

__all__ = ["PainterTask", "block_mask", "masked_smooth_l1", "match_readout_loss"]

MATCH_SCALE = 10.0  # logit per unit of cosine difference: the PrototypeMatch temperature (configs/method/prototype.yaml)


def block_mask(grid: tuple[int, int], num_masked: int, rng: np.random.Generator,
               min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """BEiT-style block masking with an exact count.

    Rectangles of random area (>= ``min_block`` patches) and log-uniform aspect ratio are added until at
    least ``num_masked`` of the (gh, gw) patches are covered; random surplus patches are then unmasked (or
    random extra ones masked) so exactly ``num_masked`` are True.

    Returns:
        (gh * gw,) bool, row-major over the patch grid.
    """
    gh, gw = grid
    m = np.zeros((gh, gw), bool)
    max_block = max(min_block, num_masked // 2)
    for _ in range(100):
        if m.sum() >= num_masked:
            break
        area = rng.uniform(min_block, max_block)
        ar = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        h = int(round(np.sqrt(area * ar)))
        w = int(round(np.sqrt(area / ar)))
        if 0 < h <= gh and 0 < w <= gw:
            top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            m[top : top + h, left : left + w] = True
    flat = m.reshape(-1)
    on, off = np.flatnonzero(flat), np.flatnonzero(~flat)
    if len(on) > num_masked:
        flat[rng.choice(on, len(on) - num_masked, replace=False)] = False
    elif len(on) < num_masked:
        flat[rng.choice(off, num_masked - len(on), replace=False)] = True
    return flat


def object_crop(image: np.ndarray, labels: np.ndarray, scale: tuple[float, float], rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """A random square crop of side s * min(H, W), s ~ U(scale), that contains a random foreground pixel
    (anywhere when the mask is empty). Returns the cropped image and labels (not resized)."""
    h, w = labels.shape
    side = max(1, int(round(rng.uniform(*scale) * min(h, w))))
    ys, xs = np.nonzero(labels)
    if len(ys):
        k = int(rng.integers(len(ys)))
        cy, cx = int(ys[k]), int(xs[k])
        top = int(rng.integers(max(0, cy - side + 1), min(cy, h - side) + 1))
        left = int(rng.integers(max(0, cx - side + 1), min(cx, w - side) + 1))
    else:
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return image[top : top + side, left : left + side], labels[top : top + side, left : left + side]


def _mean_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) model space -> (B, H, W) mean RGB in colour space, unclipped (the binary score)."""
    mean = torch.tensor(canvas.IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(canvas.IMAGENET_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x * std + mean).mean(1)


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, bool_masked_pos: torch.Tensor,
                     patch: int, beta: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample (weighted) mean smooth-L1 over masked patches' pixels, averaged over samples.

    Args:
        pred, target: (B, 3, H, W) model space (the full two-cell canvas).
        bool_masked_pos: (B, (H / patch) * (W / patch)) bool, row-major patch grid.
        weight: optional (B, 1, H, W) per-pixel weight (Painter's ``valid`` map); the mean is taken with
            these weights, so a constant weight changes nothing.
    """
    b, _, h, w = pred.shape
    m = bool_masked_pos.view(b, 1, h // patch, w // patch).to(pred.dtype)
    m = F.interpolate(m, scale_factor=patch, mode="nearest")  # (B, 1, H, W) pixel mask
    if weight is not None:
        m = m * weight.to(pred.dtype)
    per_px = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    per_sample = (per_px * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * 3).clamp_min(1e-6)
    return per_sample.mean()


def token_fraction(colour: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, h, w) binary colour cells in model space -> (B, h/patch * w/patch) foreground fraction per token."""
    fg = (_mean_rgb(colour.float()) > 0.5).float()  # white on black: mean RGB above mid-grey
    return F.avg_pool2d(fg, patch).flatten(1)


def match_readout_loss(tokens: torch.Tensor, prompt_mask: torch.Tensor, label: torch.Tensor,
                       patch: int) -> torch.Tensor:
    """BCE of the Matcher-style read-out of the image stream against the query's true token mask.

    Args:
        tokens: (B, 2h, w, C) image-stream tokens of the stacked canvas (support cell on top).
        prompt_mask, label: (B, 3, H, W) binary colour cells of the support and the query (model space).
        patch: pixels per token side.

    Returns:
        Scalar: mean BCE over query tokens that are clearly foreground (> 3/4 covered) or background (< 1/4),
        in samples whose support has foreground and background tokens; 0 when there are none.
    """
    b, gh, gw, c = tokens.shape
    f = F.normalize(tokens.float(), dim=-1)
    sup, qry = f[:, : gh // 2].reshape(b, -1, c), f[:, gh // 2 :].reshape(b, -1, c)
    s_fg = token_fraction(prompt_mask, patch) >= 0.5
    q_frac = token_fraction(label, patch)
    sims = torch.einsum("bnc,bmc->bnm", qry, sup)
    fg = sims.masked_fill(~s_fg[:, None, :], -2.0).amax(-1)
    bg = sims.masked_fill(s_fg[:, None, :], -2.0).amax(-1)
    logit = MATCH_SCALE * (fg - bg)
    valid = ((q_frac > 0.75) | (q_frac < 0.25)) & s_fg.any(1, keepdim=True) & (~s_fg).any(1, keepdim=True)
    bce = F.binary_cross_entropy_with_logits(logit, (q_frac > 0.5).float(), reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


class PainterTask:
    """``TrainTask`` of the painter (see ``incontext.train.task``).

    Args:
        model: ``SegGptConfig`` keyword arguments (architecture; ``image_size`` is the stacked canvas).
        init_checkpoint: optional folder to start from (e.g. released SegGPT weights) instead of random init.
        p_lower_half: probability of masking exactly the target half (else random blocks, half the patches).
        random_background: probability of a random (not black) background colour.
        p_random_colour: probability of SegGPT's random colouring for a sample; otherwise Painter's fixed
            palette (binary: white on black, the inference colours).
        hflip: probability of flipping prompt and query together.
        p_crop: probability of a random object crop, drawn for prompt and query independently.
        crop_scale: crop side range as fractions of the shorter image side (Painter: 0.3..1 of the area).
        fg_weight: loss weight of pixels whose true colour is a class colour (background pixels weigh 1).
            1.0 = SegGPT's unweighted loss; small objects on a tiny budget need more (Painter weights pose
            foreground x10 for the same reason), else painting everything black is a deep local minimum.
        min_colour_distance: minimum distance between a sample's random colours (0..255 units).
        p_self_prompt: probability that the prompt pair is the query's own (image, mask) under an independent
            object crop and flip: a correspondence warm-up whose answer is always findable by matching
            appearance, the attention path that in-context segmentation needs (from-scratch runs on all train
            classes otherwise stayed on the constant-prior plateau for 1,000+ steps).
        dice_weight: weight of a soft Dice term on the painted query cell's binary score (mean RGB, SegGPT's
            decoding rule) against the true mask, beside the smooth-L1 (0 = SegGPT's loss only). Binary colours
            only (``p_random_colour`` 0). A deviation from SegGPT's recipe: a constant painting (the L2 optimum
            when nothing is matched yet) scores badly under Dice, whatever the object size.
        p_hint_drop: models with a matching prior: probability that a sample's hint is replaced by uniform grey
            (p = 0.5, "no information"), so the answer must come from the prompt pair (condition dropout, as the
            diffusion generator's ``p_uncond``). Evaluation always shows the prior.
        p_wrong_hint: models with a matching prior: probability that a sample's hint is the prior computed from a
            decoy support of another class (``TrainItem.decoys``, e.g. ``DecoyEpisodes``) while the prompt pair
            and the target stay the episode's own, so only reading the pair tells whether the hint can be
            trusted (the first, 1,500-step painter_tiny ignored its pair: issue 8's ablation).
        match_weight: weight of the matching read-out loss on the image stream (module docstring; 0 = off).
            Binary colours only (``p_random_colour`` 0).
        match_layer: the block whose image-stream output is read out (before SegGPT's stream merge).
        embedding_type: type token used in training and evaluation.
        eval_ensemble: k-shot rule of the evaluation segmenter ("feature" or "spatial").
    """

    name = "painter"

    def __init__(
        self,
        model: dict[str, Any],
        init_checkpoint: str | None = None,
        p_lower_half: float = 0.1,
        random_background: float = 0.0,
        p_random_colour: float = 1.0,
        hflip: float = 0.5,
        p_crop: float = 0.0,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        min_colour_distance: float = 96.0,
        fg_weight: float = 1.0,
        p_self_prompt: float = 0.0,
        dice_weight: float = 0.0,
        p_hint_drop: float = 0.0,
        p_wrong_hint: float = 0.0,
        match_weight: float = 0.0,
        match_layer: int = 1,
        embedding_type: str = "instance",
        eval_ensemble: str = "feature",
    ) -> None:
        self.model_config = dict(model)
        self.init_checkpoint = init_checkpoint
        self.p_lower_half = float(p_lower_half)
        self.random_background = float(random_background)
        self.p_random_colour = float(p_random_colour)
        self.hflip = float(hflip)
        self.p_crop = float(p_crop)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.min_colour_distance = float(min_colour_distance)
        self.fg_weight = float(fg_weight)
        self.p_self_prompt = float(p_self_prompt)
        self.dice_weight = float(dice_weight)
        self.p_hint_drop = float(p_hint_drop)
        self.p_wrong_hint = float(p_wrong_hint)
        self.match_weight, self.match_layer = float(match_weight), int(match_layer)
        if self.match_weight > 0 and self.p_random_colour > 0:
            raise ValueError("match_weight needs binary colours (p_random_colour=0): targets are white on black")
        if self.dice_weight > 0 and self.p_random_colour > 0:
            raise ValueError("dice_weight needs binary colours (p_random_colour=0): the score is mean RGB")
        self.embedding_type = embedding_type
        self.eval_ensemble = eval_ensemble
        config = seggpt_config(self.model_config) if init_checkpoint is None else \
            load_seggpt_config(init_checkpoint)
        self.cell = cell_size(config)
        self.patch = int(config.patch_size)
        self.beta = float(config.beta)
        self._matcher = prior_matcher(config)
        if self._matcher is not None and self.p_lower_half < 1.0:
            raise ValueError("a model with match_prior repaints the query cell: set p_lower_half=1.0")

    # ------------------------------------------------------------------ TrainTask
    def build_model(self) -> torch.nn.Module:
        if self.init_checkpoint is not None:
            return load_seggpt(self.init_checkpoint).train()
        return build_seggpt(self.model_config).train()

    def make_sample(self, item: TrainItem, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Tensors of one canvas: ``query``, ``prompt``, ``prompt_mask``, ``label`` (3, h, w) model space,
        ``bool_masked_pos`` (num_patches,) bool over the stacked canvas and the loss ``weight`` (1, 2h, w)."""
        sup = item.supports[int(rng.integers(len(item.supports)))]
        self_prompt = self.p_self_prompt > 0 and rng.random() < self.p_self_prompt
        if self_prompt:
            sup = SimpleNamespace(image=item.query, mask=item.query_mask)
        classes = sorted(set(np.unique(sup.mask).tolist()) - {0})
        lut = np.zeros(256, np.uint8)  # support classes -> palette rows 1..C; anything else -> background
        lut[classes] = np.arange(1, len(classes) + 1)
        if rng.random() < self.p_random_colour:
            palette = canvas.random_palette(
                len(classes), rng, self.min_colour_distance,
                random_background=bool(rng.random() < self.random_background),
            )
        else:
            palette = canvas.painter_palette(max(1, len(classes)))
        h, w = self.cell
        pairs, crops = [], []
        for img, lab in ((sup.image, lut[sup.mask]), (item.query, lut[item.query_mask])):
            if self_prompt or (self.p_crop > 0 and rng.random() < self.p_crop):
                img, lab = object_crop(img, lab, self.crop_scale, rng)
            crops.append((img, lab))
            pairs.append((canvas.resize_image(img, (h, w)), canvas.resize_labels(lab, (h, w))))
        (p_img, p_lab), (q_img, q_lab) = pairs
        hint = None
        if self._matcher is not None:  # on the crops at rendered size, as inference runs it on the full images
            (pi, pl), (qi, _) = crops
            cue = Support.from_arrays(pi, (pl > 0).astype(np.uint8))
            if self.p_wrong_hint > 0 and rng.random() < self.p_wrong_hint:  # no draw at 0: old runs replay
                if not item.decoys:
                    raise ValueError("p_wrong_hint needs training items with decoys (data.train: DecoyEpisodes)")
                decoy = item.decoys[int(rng.integers(len(item.decoys)))]
                cue = Support.from_arrays(decoy.image, (np.asarray(decoy.mask) > 0).astype(np.uint8))
            with torch.no_grad():
                state = self._matcher.prepare([cue])
                hint = canvas.resize_image(canvas.grey_image(self._matcher.similarity(qi, state, {})), (h, w))
            if self.p_hint_drop > 0 and rng.random() < self.p_hint_drop:
                hint = np.full_like(hint, 128)
        if self_prompt and rng.random() < 0.5:  # the two views differ by a flip too
            p_img, p_lab = np.ascontiguousarray(p_img[:, ::-1]), np.ascontiguousarray(p_lab[:, ::-1])
        if rng.random() < self.hflip:
            p_img, q_img, p_lab, q_lab = (np.ascontiguousarray(a[:, ::-1]) for a in (p_img, q_img, p_lab, q_lab))
            if hint is not None:
                hint = np.ascontiguousarray(hint[:, ::-1])
        p_col, q_col = canvas.encode_mask(p_lab, palette), canvas.encode_mask(q_lab, palette)
        weight = 1.0 + (self.fg_weight - 1.0) * (np.concatenate([p_lab, q_lab], 0) > 0)
        gh, gw = 2 * h // self.patch, w // self.patch
        n = gh * gw
        if rng.random() < self.p_lower_half:
            bmp = np.zeros(n, bool)
            bmp[n // 2 :] = True
        else:
            bmp = block_mask((gh, gw), n // 2, rng)
        out = {
            "query": canvas.to_model(q_img),
            "prompt": canvas.to_model(p_img),
            "prompt_mask": canvas.to_model(p_col),
            "label": canvas.to_model(q_col),
            "bool_masked_pos": torch.from_numpy(bmp),
            "weight": torch.from_numpy(weight.astype(np.float32))[None],
        }
        if hint is not None:
            out["hint"] = canvas.to_model(hint)
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        hint = batch.get("hint")
        seen: list[torch.Tensor] = []
        handle = None
        if self.match_weight > 0:
            layers = getattr(model, "module", model).model.encoder.layers
            if not 0 <= self.match_layer <= getattr(model, "module", model).config.merge_index:
                raise ValueError(f"match_layer {self.match_layer}: must be a block before the stream merge "
                                 f"(0..merge_index)")
            # before the merge the batch holds [image stream; colour stream]: keep the images' half
            handle = layers[self.match_layer].register_forward_hook(
                lambda _m, _i, out: seen.append(out[0][: batch["query"].shape[0]]))
        try:
            out = model(
                pixel_values=batch["query"],
                prompt_pixel_values=batch["prompt"],
                prompt_masks=batch["prompt_mask"],
                # the colour stream's query cell: the target (masked patches are replaced by mask tokens), or the
                # prior's grey hint with nothing masked; the loss covers bool_masked_pos either way
                labels=batch["label"] if hint is None else hint,
                bool_masked_pos=batch["bool_masked_pos"] if hint is None else
                torch.zeros_like(batch["bool_masked_pos"]),
                embedding_type=self.embedding_type,
            )
        finally:
            if handle is not None:
                handle.remove()
        target = torch.cat([batch["prompt_mask"], batch["label"]], dim=2)
        loss = masked_smooth_l1(out.pred_masks.float(), target.float(), batch["bool_masked_pos"],
                                self.patch, self.beta, batch.get("weight"))
        logs: dict[str, float] = {}
        if self.dice_weight > 0:
            h = self.cell[0]
            score = _mean_rgb(out.pred_masks[:, :, h:].float()).clamp(0.0, 1.0).flatten(1)
            fg = (_mean_rgb(batch["label"].float()) > 0.5).float().flatten(1)
            dice = 1 - (2 * (score * fg).sum(1) + 1) / (score.sum(1) + fg.sum(1) + 1)
            loss = loss + self.dice_weight * dice.mean()
            logs["dice"] = float(dice.detach().mean())
        if self.match_weight > 0:
            match = match_readout_loss(seen[0], batch["prompt_mask"], batch["label"], self.patch)
            loss = loss + self.match_weight * match
            logs["match"] = float(match.detach())
        return loss, logs

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint is noise in the log
        try:
            model.save_pretrained(str(directory))
        finally:
            if was:
                hf_logging.enable_progress_bar()

    def segmenter(self, model: torch.nn.Module, device: torch.device):
        from incontext.pipeline import Pipeline

        stage = PainterStage.from_model(model, ensemble=self.eval_ensemble,
                                        embedding_type=self.embedding_type, device=device)
        return Pipeline(name="painter", device=device, generate=stage)
