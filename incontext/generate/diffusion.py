"""Diffusion-conditioned mask generation: the ``generate`` stage ``DiffusionStage`` and ``method=diffusion``.

A conditional denoiser of the query mask (``diffusion_net``) sampled with a few deterministic DDIM steps
(``diffusion_process``):

1. ``prepare(supports)``: supports -> model frame -> encoder tokens -> support code (tokens with fg/bg
   embedding, prototype, token bank, and the denoiser's per-block support keys / values). Computed once per
   context and reused for every step, sample and query.
2. ``__call__``: the query's tokens are computed once per query (``carry.cache``, shared by every class), the
   matching prior once per (query, class); then ``n_samples`` DDIM chains of ``steps`` denoiser calls run as one
   batch. ``steps=1`` is plain regression (one x0 prediction from pure noise). Output: ``carry.prob`` = mean
   of the samples' probabilities (query size) and ``carry.extras["uncertainty"]`` (query size, in [0, 1]):
   the binary entropy of that mean ("entropy", any n_samples) or 2 x the samples' std ("std", n_samples >= 2).
   ``infer.py`` writes it as ``<stem>_uncertainty.png``.
3. ``guidance_scale`` != 1: classifier-free guidance on the x0 logits,
   l = l_uncond + w (l_cond - l_uncond), the unconditional branch seeing only the null support token and a
   zero prior (the model is trained with condition dropout).

Models trained with ``match_prior`` also read the ``match`` stage's foreground probability (``carry.prior``,
the training-free ``PrototypeMatch`` on handcrafted features, built from the model's config by
``DiffusionMethod``), area-pooled to the token grid, as one more query-aligned channel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from incontext.backbones.weights import shipped
from incontext.episode import Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.generate.diffusion_net import DiffusionSegModel, SupportCode
from incontext.generate.diffusion_process import ddim_sample, make_scheduler
from incontext.pipeline import Carry, Pipeline, State, resize_map

__all__ = ["DiffusionStage", "DiffusionMethod", "load_diffusion", "DEFAULT_CHECKPOINT", "to_frame",
           "mask_to_frame", "build_match_stage", "match_stage_for"]

# The checkpoint shipped in the repository (trained by `python train.py experiment=diffusion_tiny`); a copy in an
# earlier weights search place (incontext.backbones.weights.search_dirs) wins.
SHIPPED_NAME = "diffusion_tiny"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "weights" / SHIPPED_NAME
UNCERTAINTY = ("entropy", "std")


def load_diffusion(checkpoint: str | Path, device: str | torch.device = "cpu") -> DiffusionSegModel:
    """Load a ``DiffusionSegModel`` from a local folder with ``config.json`` + ``model.safetensors``."""
    path = Path(checkpoint).expanduser()
    missing = [n for n in ("config.json", "model.safetensors") if not (path / n).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"diffusion checkpoint: {', '.join(missing)} not found in {str(path)!r}. A checkpoint is a folder "
            "with config.json + model.safetensors: the repository ships weights/diffusion_tiny, or train "
            "one with `python train.py experiment=diffusion_tiny` (then use runs/diffusion_tiny/checkpoints/"
            "best); set checkpoint=<folder> (config key generate.checkpoint, or checkpoint= for "
            "method=diffusion)"
        )
    return DiffusionSegModel.from_pretrained(path, device)


def build_match_stage(spec: dict[str, Any]):
    """The training-free ``PrototypeMatch`` stage described by a model's ``config.match_prior``."""
    from incontext.features import HandcraftedFeatures
    from incontext.match.prototype import PrototypeMatch

    spec = dict(spec)
    feats = HandcraftedFeatures(size=int(spec.pop("size", 128)), stride=int(spec.pop("stride", 4)))
    try:
        return PrototypeMatch(feats, **spec)
    except TypeError as err:
        raise InputError(f"model config match_prior: {err}; keys are size, stride, bg_prototypes, temperature, "
                         "fg_threshold, min_area") from None


def match_stage_for(checkpoint: str | Path | None = None, model_config: dict[str, Any] | None = None):
    """The match stage a diffusion checkpoint was trained to read (its ``config.match_prior``), or None.

    For pipelines that put the diffusion generator behind their own ``match`` stage (``method=generalist``), so
    the prior it reads is the one it was trained with. Arguments as ``DiffusionStage`` (None = shipped weights);
    only ``config.json`` is read.
    """
    if model_config is not None and checkpoint is None:
        spec = dict(model_config).get("match_prior")
    else:
        path = Path(checkpoint if checkpoint is not None else (shipped(SHIPPED_NAME) or DEFAULT_CHECKPOINT))
        path = path.expanduser()
        if not (path / "config.json").is_file():
            load_diffusion(path)  # raises the WeightsNotFoundError that names the missing files
        spec = json.loads((path / "config.json").read_text(encoding="utf-8")).get("match_prior")
    return None if spec is None else build_match_stage(dict(spec))


def to_frame(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [0, 1] (area resampling when shrinking; aspect ignored)."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp) if (h, w) != (size, size) else image
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float() / 255.0


def mask_to_frame(mask: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) 0/1 mask -> (size, size) float coverage in [0, 1] (area resampling)."""
    m = (np.asarray(mask) > 0).astype(np.float32)
    if m.shape != (size, size):
        interp = cv2.INTER_AREA if size < max(m.shape) else cv2.INTER_LINEAR
        m = cv2.resize(m, (size, size), interpolation=interp)
    return torch.from_numpy(np.clip(m, 0.0, 1.0))


class DiffusionStage:
    """The ``generate`` stage of ``method=diffusion``.

    Args:
        checkpoint: folder with ``config.json`` + ``model.safetensors``; None = the shipped
            ``weights/diffusion_tiny`` (unless ``model`` or ``model_config`` is given).
        model_config: ``DiffusionConfig`` keyword arguments for a randomly initialised model (tests only).
        model: a live ``DiffusionSegModel`` (the trainer's); wins over the two above.
        steps: DDIM steps (denoiser calls) per sample; 1 = regression.
        n_samples: independent samples averaged (ensemble); their spread is the "std" uncertainty.
        guidance_scale: classifier-free guidance weight (1 = conditional only, no extra pass).
        uncertainty: "entropy" (of the mean probability) or "std" (of the samples; needs n_samples >= 2).
        self_condition: feed each step's x0 estimate back (as trained).
        seed: seeds the initial noise; the same query always gets the same samples.
        max_shots: use at most this many supports (first ones); None = all.
        device: where the model runs.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_config: dict[str, Any] | None = None,
        model: DiffusionSegModel | None = None,
        steps: int = 1,
        n_samples: int = 1,
        guidance_scale: float = 1.0,
        uncertainty: str = "entropy",
        self_condition: bool = True,
        seed: int = 0,
        max_shots: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if int(steps) < 1:
            raise InputError(f"steps: {steps!r}; pass 1 or more (1 = one x0 prediction, regression)")
        if int(n_samples) < 1:
            raise InputError(f"n_samples: {n_samples!r}; pass 1 or more")
        if uncertainty not in UNCERTAINTY:
            raise InputError(f"uncertainty: {uncertainty!r} is not one of {UNCERTAINTY}")
        if uncertainty == "std" and int(n_samples) < 2:
            raise InputError("uncertainty='std' needs n_samples >= 2 (the spread of the samples); "
                             "set n_samples=4, or uncertainty='entropy'")
        if max_shots is not None and int(max_shots) < 1:
            raise InputError(f"max_shots: {max_shots!r}; pass 1 or more, or null for all supports")
        self.device = torch.device(device)
        if model is None:
            if model_config is not None and checkpoint is None:
                model = DiffusionSegModel(model_config).eval()
            else:
                model = load_diffusion(checkpoint if checkpoint is not None else (shipped(SHIPPED_NAME) or DEFAULT_CHECKPOINT))
        self.model = model.to(self.device)
        self.steps = int(steps)
        self.n_samples = int(n_samples)
        self.guidance_scale = float(guidance_scale)
        self.uncertainty = uncertainty
        self.self_condition = bool(self_condition)
        self.seed = int(seed)
        self.max_shots = None if max_shots is None else int(max_shots)
        self.size = int(model.config.image_size)
        self._scheduler = make_scheduler()

    def to(self, device: str | torch.device) -> "DiffusionStage":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------ Stage protocol
    def prepare(self, supports: list[Support]) -> State:
        """Encode the supports once: the ``SupportCode`` tensors (tokens (1 + K h w, C), valid, proto (F,),
        bank (K h w, F), fg / bg (K h w,), per-block keys / values ``kv<i>``)."""
        if not supports:
            raise InputError("diffusion: no supports; pass at least one (image, mask) pair")
        sup = supports[: self.max_shots] if self.max_shots else supports
        images = torch.stack([to_frame(s.image, self.size) for s in sup]).to(self.device)
        masks = torch.stack([mask_to_frame(s.mask, self.size) for s in sup]).to(self.device)
        with torch.no_grad():
            feats = self.model.encode_images(images)
            code = self.model.encode_supports(feats[None], masks[None])
        return code.to_state()

    def __call__(self, carry: Carry, state: State) -> None:
        """Sample the query mask: sets ``carry.prob`` (H, W) and ``carry.extras["uncertainty"]`` (H, W), and
        clears a ``carry.mask`` an earlier match stage may have decided (the decision is now ``prob``'s)."""
        sup = SupportCode.from_state(state)
        match = None
        if self.model.config.match_prior is not None:
            if carry.prior is None:
                raise InputError(
                    "diffusion: this model needs the match stage's prior (config.match_prior) but no stage set "
                    "carry.prior; use DiffusionMethod, which adds its PrototypeMatch stage"
                )
            g = self.model.config.grid
            match = F.adaptive_avg_pool2d(carry.prior.float()[None, None].to(self.device), (g, g))
        key = f"diffusion.query.{self.size}.{id(self.model)}"
        with torch.no_grad():
            if key not in carry.cache:  # shared by every class segmented on this query
                frame = to_frame(carry.query, self.size)[None].to(self.device)
                carry.cache[key] = self.model.encode_images(frame)
            probs = self.sample(carry.cache[key], sup, match)  # (n, S, S)
        h, w = carry.query.shape[:2]
        mean = probs.mean(0)
        prob = resize_map(mean, (h, w)).clamp(0, 1)
        if self.uncertainty == "std":
            unc = resize_map(2 * probs.std(0, unbiased=False), (h, w)).clamp(0, 1)
        else:
            unc = binary_entropy(prob)
        carry.prob = prob
        carry.mask = None
        carry.extras["uncertainty"] = unc.cpu().numpy().astype(np.float32)
        carry.extras["diffusion"] = {"steps": self.steps, "n_samples": self.n_samples,
                                     "guidance_scale": self.guidance_scale}
        carry.extras.setdefault("stage_scores", {})["generate"] = float(mean.max())

    # ------------------------------------------------------------------ sampling
    def sample(self, qfeat: torch.Tensor, sup: SupportCode, match: torch.Tensor | None = None) -> torch.Tensor:
        """``n_samples`` probability maps (n, S, S) in the model frame for one query's tokens (1, F, h, w)
        (and the match-stage prior (1, 1, h, w) for models that use one)."""
        n = self.n_samples
        guided = self.guidance_scale != 1.0
        sup_n = sup.expand(n)
        cond = self.model.condition(qfeat, sup, match=match).expand(n, -1, -1, -1)
        if guided:
            unc_sup = sup.unconditional().expand(n)
            drop = torch.ones(1, dtype=torch.bool, device=qfeat.device)
            unc_cond = self.model.condition(qfeat, sup, drop, match).expand(n, -1, -1, -1)

        def denoise(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
            out = self.model.denoise(x, t, sc, cond, sup_n)
            if guided:
                out_u = self.model.denoise(x, t, sc, unc_cond, unc_sup)
                out = out_u + self.guidance_scale * (out - out_u)
            return out

        gen = torch.Generator().manual_seed(self.seed)
        logits = ddim_sample(denoise, (n, 1, self.size, self.size), self.steps, gen,
                             self_condition=self.self_condition, scheduler=self._scheduler,
                             device=qfeat.device)
        return torch.sigmoid(logits[:, 0])


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of a Bernoulli(p) in bits, elementwise, in [0, 1]."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


class DiffusionMethod(Pipeline):
    """``method=diffusion``: a ``Pipeline`` whose generate stage is a ``DiffusionStage`` (optionally followed
    by a refine stage), with the stage's settings at the top level so ``build("diffusion", steps=4)`` works.

    Args:
        checkpoint, model_config, steps, n_samples, guidance_scale, uncertainty, self_condition, seed,
            max_shots: see ``DiffusionStage`` (checkpoint None = the shipped ``weights/diffusion_tiny``).
        model: a live ``DiffusionSegModel`` (used by the trainer's evaluation).
        match: optional match stage; None = the ``PrototypeMatch`` described by the model's
            ``config.match_prior`` when it has one (else no match stage).
        refine: optional refine stage (e.g. SAM prompted by the generated mask).
        name, device, retriever, shots, threshold: see ``Pipeline``.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_config: dict[str, Any] | None = None,
        steps: int = 1,
        n_samples: int = 1,
        guidance_scale: float = 1.0,
        uncertainty: str = "entropy",
        self_condition: bool = True,
        seed: int = 0,
        max_shots: int | None = None,
        model: DiffusionSegModel | None = None,
        match: Any = None,
        refine: Any = None,
        name: str = "diffusion",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
        threshold: float = 0.5,
    ) -> None:
        stage = DiffusionStage(checkpoint=checkpoint, model_config=model_config, model=model, steps=steps,
                               n_samples=n_samples, guidance_scale=guidance_scale, uncertainty=uncertainty,
                               self_condition=self_condition, seed=seed, max_shots=max_shots, device=device)
        spec = stage.model.config.match_prior
        if match is None and spec is not None:
            match = build_match_stage(spec)
        super().__init__(name=name, device=device, retriever=retriever, shots=shots, match=match,
                         generate=stage, refine=refine, threshold=threshold)
