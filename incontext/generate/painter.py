"""Grid-inpainting generator (SegGPT / Painter) on transformers' ``SegGptForImageSegmentation``.

One code path serves the released ``BAAI/seggpt-vit-large`` (loaded from a local folder) and the tiny configs
trained here with ``train.py``: both are the same class, saved in the Hugging Face layout (``config.json`` +
``model.safetensors``).

How an episode is painted (reference note ``seggpt_painter.md``, sections 2-6):

1. Every support image and query is resized to one canvas *cell* (h, w) = (canvas_h / 2, canvas_w), aspect
   ratio ignored. Masks are colour-coded (binary: white on black) and resized nearest.
2. Two streams are stacked by the model: images [support; query] and colours [support mask; masked]. The
   model inpaints the masked lower half of the colour stream.
3. k shots: ``ensemble="feature"`` runs K canvases (one per support, the query repeated) with SegGPT's
   feature ensemble — only for K >= 2, because transformers' implementation changes a K = 1 output (quirk 1);
   ``ensemble="spatial"`` tiles the K supports (and K copies of the query) n x n inside one cell and averages
   the n x n painted query tiles.
4. Checkpoints whose config has ``match_prior`` (the shipped ``painter_tiny``; a deviation from SegGPT) also
   read the training-free matching prior: ``PrototypeMatch`` (handcrafted features) on the episode's images,
   drawn as a grey soft mask in the query's colour cell instead of mask tokens, so the model repaints a hint
   rather than inpainting from nothing (see ``painter_task`` for why).
   Checkpoints whose config has ``conv_stem`` (another deviation) embed patches with a small convolutional stem
   instead of SegGPT's single patch x patch projection (``ConvStem``).
5. The painted lower half is de-normalised to RGB in [0, 1] and decoded at the query's size: binary -> the
   projection on the black -> white segment (= mean RGB, SegGPT's rule); multi-class -> nearest palette colour
   with softmax scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from incontext.backbones.weights import shipped
from incontext.episode import Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.generate import canvas
from incontext.pipeline import Carry, Pipeline, State

__all__ = ["PainterMethod", "PainterStage", "ConvStem", "load_seggpt", "load_seggpt_config", "build_seggpt", "seggpt_config",
           "paint", "prior_matcher", "SEGGPT_HUB_ID"]

SEGGPT_HUB_ID = "BAAI/seggpt-vit-large"
# Trained here by `python train.py experiment=painter_tiny` and shipped in weights/ (the no-checkpoint default).
SHIPPED_NAME = "painter_tiny"
ENSEMBLES = ("feature", "spatial")
EMBEDDING_TYPES = ("instance", "semantic")


# ------------------------------------------------------------------------------------------ loading
def seggpt_config(model_config: dict[str, Any]) -> Any:
    """``SegGptConfig`` from keyword arguments, with a clear error for bad ones."""
    from transformers import SegGptConfig

    try:
        return SegGptConfig(**dict(model_config))
    except (TypeError, ValueError) as err:
        raise InputError(f"model_config: {err}; see SegGptConfig for the accepted keys") from None


class ConvStem(torch.nn.Module):
    """Patch embedding by stride-2 3x3 convolutions (GroupNorm + GELU), then a 1x1 projection to the token width.

    A deviation from SegGPT, whose patch embedding is one ``patch x patch`` linear projection: trained from
    scratch on a CPU budget, that projection of 8 x 8 textured patches is the tiny painter's weak point, and
    early convolutions are the known remedy for ViTs trained from scratch (Xiao et al. 2021, "Early
    convolutions help transformers see better"). Used for both of SegGPT's streams (images and colour masks),
    as the projection it replaces.

    Args:
        in_channels: input channels (3).
        widths: one width per stride-2 convolution; ``2 ** len(widths)`` must equal the patch size.
        hidden_size: the transformer's token width.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], hidden_size: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        c = int(in_channels)
        for w in widths:
            w = int(w)
            layers += [torch.nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False),
                       torch.nn.GroupNorm(min(8, w), w), torch.nn.GELU()]
            c = w
        layers.append(torch.nn.Conv2d(c, int(hidden_size), 1))
        self.layers = torch.nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: ``SegGptModel.forward`` reads ``projection.weight.dtype`` to cast
        its inputs."""
        return self.layers[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _with_conv_stem(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the patch projection for a ``ConvStem`` when the config asks for one (``conv_stem``: widths)."""
    widths = getattr(model.config, "conv_stem", None)
    if not widths:
        return model
    patch = model.config.patch_size
    if 2 ** len(widths) != patch:
        raise InputError(f"model_config.conv_stem: {len(widths)} stride-2 convolutions give patch "
                         f"{2 ** len(widths)}, but patch_size is {patch}; give log2(patch_size) widths")
    embed = model.model.embeddings.patch_embeddings
    embed.projection = ConvStem(model.config.num_channels, widths, model.config.hidden_size)
    return model


def build_seggpt(model_config: dict[str, Any]) -> torch.nn.Module:
    """A randomly initialised ``SegGptForImageSegmentation`` from ``SegGptConfig`` keyword arguments
    (tiny configs for tests and training from scratch). Seed ``torch`` before calling for a reproducible init."""
    from transformers import SegGptForImageSegmentation

    return _with_conv_stem(SegGptForImageSegmentation(seggpt_config(model_config)))


def _resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local folder holding ``config.json`` + ``model.safetensors``; a Hub id is looked up in the local
    Hugging Face cache only (never downloaded)."""
    path = Path(checkpoint).expanduser()
    looked = [str(path)]
    if not path.exists() and isinstance(checkpoint, str) and checkpoint.count("/") == 1 \
            and not checkpoint.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(checkpoint, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError and friends: not in the cache
            from huggingface_hub.constants import HF_HUB_CACHE

            looked.append(f"the Hugging Face cache ({HF_HUB_CACHE})")
    missing = [n for n in ("config.json", "model.safetensors") if not (path / n).is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"painter checkpoint: {', '.join(missing)} not found for {str(checkpoint)!r} (looked in "
            f"{' and '.join(looked)}). A checkpoint is a folder with config.json + model.safetensors: train one "
            f"with `python train.py experiment=painter_tiny`, or on a machine with internet run "
            f"`huggingface-cli download {SEGGPT_HUB_ID} --local-dir seggpt-vit-large` and copy the folder here; "
            f"then set checkpoint=<folder> (config key generate.checkpoint of method=painter)"
        )
    return path


def load_seggpt_config(checkpoint: str | Path) -> Any:
    """The ``SegGptConfig`` of a checkpoint folder (or cached Hub id) without loading its weights."""
    from transformers import SegGptConfig

    return SegGptConfig.from_pretrained(str(_resolve_checkpoint(checkpoint)), local_files_only=True)


def load_seggpt(checkpoint: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load ``SegGptForImageSegmentation`` from a local Hugging Face folder (or a cached Hub id such as
    ``BAAI/seggpt-vit-large``), safetensors only, offline, in eval mode on ``device``."""
    from transformers import SegGptConfig, SegGptForImageSegmentation
    from transformers.utils import logging as hf_logging

    folder = _resolve_checkpoint(checkpoint)
    config = SegGptConfig.from_pretrained(str(folder), local_files_only=True)
    if getattr(config, "conv_stem", None):  # from_pretrained would build (and fill) the plain projection
        from safetensors.torch import load_file

        model = _with_conv_stem(SegGptForImageSegmentation(config))
        try:
            model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        except RuntimeError as err:
            raise InputError(f"checkpoint {str(checkpoint)!r}: model.safetensors does not fit its config.json "
                             f"({str(err).splitlines()[0]}); re-save the folder with train.py") from None
        return model.eval().to(device)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per build is noise for users
    try:
        model = SegGptForImageSegmentation.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True
        )
    finally:
        if was:
            hf_logging.enable_progress_bar()
    return model.eval().to(device)


def prior_matcher(config: Any) -> Any:
    """The ``PrototypeMatch`` a model (or its ``SegGptConfig``) was trained to read, from the config's extra key
    ``match_prior`` (size, stride, bg_prototypes, temperature, fg_threshold); None for plain SegGPT."""
    spec = getattr(getattr(config, "config", config), "match_prior", None)
    if not spec:
        return None
    from incontext.generate.diffusion import build_match_stage

    return build_match_stage(dict(spec))


# ------------------------------------------------------------------------------------------ painting
def cell_size(model: Any) -> tuple[int, int]:
    """(h, w) of one canvas cell of a model (or its ``SegGptConfig``): half the stacked canvas height, full
    width."""
    size = getattr(model, "config", model).image_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return h // 2, w


@torch.no_grad()
def paint(
    model: torch.nn.Module,
    query: torch.Tensor,
    prompt_images: torch.Tensor,
    prompt_masks: torch.Tensor,
    embedding_type: str = "instance",
    hint: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inpaint the query's colour cell from K prompt pairs (feature ensemble when K >= 2).

    Args:
        model: ``SegGptForImageSegmentation``.
        query: (3, h, w) model space (ImageNet-normalised cell).
        prompt_images: (K, 3, h, w) model space.
        prompt_masks: (K, 3, h, w) colour-coded masks in model space.
        embedding_type: "instance" (SegGPT's default) or "semantic".
        hint: optional (3, h, w) model-space colour cell shown in place of the mask tokens (models trained with
            a ``match_prior``): nothing is masked and the model repaints the hint.

    Returns:
        (3, h, w) painted query colours, colour space RGB in [0, 1].
    """
    k = prompt_images.shape[0]
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    extra: dict[str, torch.Tensor] = {}
    if hint is not None:
        n = model.model.embeddings.patch_embeddings.num_patches
        extra = {"labels": hint[None].expand(k, -1, -1, -1).to(dev, dtype),
                 "bool_masked_pos": torch.zeros(1, n, dtype=torch.bool, device=dev)}
    out = model(
        pixel_values=query[None].expand(k, -1, -1, -1).to(dev, dtype),  # transformers #30196: repeat query
        prompt_pixel_values=prompt_images.to(dev, dtype),
        prompt_masks=prompt_masks.to(dev, dtype),
        feature_ensemble=k >= 2,  # quirk 1: a K = 1 ensemble would still change the output
        embedding_type=embedding_type,
        **extra,
    )
    h = query.shape[-2]
    return canvas.denormalise(out.pred_masks[0, :, h:].float())


class PainterStage:
    """The ``generate`` stage of ``method=painter``: supports -> colour prompts -> painted query -> prob.

    Args:
        checkpoint: local folder (or cached Hub id) with ``config.json`` + ``model.safetensors``; None (and no
            ``model_config``) = the shipped ``weights/painter_tiny`` trained here.
        model_config: ``SegGptConfig`` keyword arguments for a randomly initialised model (tests, training);
            used only when ``checkpoint`` is None.
        model: an already built ``SegGptForImageSegmentation`` (the trainer's live model); wins over the two.
        ensemble: "feature" (SegGPT's official k-shot) or "spatial" (tile supports inside one cell).
        max_shots: use at most this many supports (first ones); None = all.
        embedding_type: "instance" or "semantic" type token.
        device: where the model runs.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_config: dict[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        ensemble: str = "feature",
        max_shots: int | None = None,
        embedding_type: str = "instance",
        device: str | torch.device = "cpu",
    ) -> None:
        if ensemble not in ENSEMBLES:
            raise InputError(f"ensemble: {ensemble!r} is not one of {ENSEMBLES}")
        if embedding_type not in EMBEDDING_TYPES:
            raise InputError(f"embedding_type: {embedding_type!r} is not one of {EMBEDDING_TYPES}")
        if max_shots is not None and int(max_shots) < 1:
            raise InputError(f"max_shots: {max_shots} must be >= 1 or null (all supports)")
        self.device = torch.device(device)
        if model is None:
            if checkpoint is not None:
                model = load_seggpt(checkpoint, self.device)
            elif model_config is not None:
                model = build_seggpt(model_config).eval()
            elif shipped(SHIPPED_NAME) is not None:
                model = load_seggpt(shipped(SHIPPED_NAME), self.device)
            else:
                raise WeightsNotFoundError(
                    f"painter: no weights; the shipped weights/{SHIPPED_NAME} (config.json + model.safetensors) "
                    "is missing: restore it from the repository or retrain it with `python train.py "
                    "experiment=painter_tiny`, or set checkpoint=<folder> (infer.py / evaluate: "
                    "method.checkpoint=...; e.g. a local copy of BAAI/seggpt-vit-large)"
                )
        self.model = model.to(self.device)
        self.matcher = prior_matcher(self.model)
        self.ensemble = ensemble
        self.max_shots = None if max_shots is None else int(max_shots)
        self.embedding_type = embedding_type

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "PainterStage":
        """Wrap a live model (no copy; the caller keeps it in eval mode while painting)."""
        return cls(model=model, **kwargs)

    @property
    def cell(self) -> tuple[int, int]:
        return cell_size(self.model)

    def to(self, device: str | torch.device) -> "PainterStage":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------ Stage protocol
    def prepare(self, supports: list[Support]) -> State:
        """Resize the supports to cells once: ``images`` (K, h, w, 3) uint8 and ``masks`` (K, h, w) uint8 0/1
        (for the spatial ensemble K = 1: the tiled cell, and ``grid`` n); models with a matching prior also get
        the matcher's prototypes of all K supports (``match``)."""
        if not supports:
            raise InputError("painter: no supports; pass at least one (image, mask) pair")
        sup = supports[: self.max_shots] if self.max_shots else supports
        h, w = self.cell
        if self.ensemble == "spatial" and len(sup) > 1:
            images = canvas.tile([s.image for s in sup], (h, w), is_mask=False)[None]
            masks = canvas.tile([(s.mask > 0).astype(np.uint8) for s in sup], (h, w), is_mask=True)[None]
            grid = canvas.grid_side(len(sup))
        else:
            images = np.stack([canvas.resize_image(s.image, (h, w)) for s in sup])
            masks = np.stack([canvas.resize_labels((s.mask > 0).astype(np.uint8), (h, w)) for s in sup])
            grid = 1
        state = {"images": torch.from_numpy(images), "masks": torch.from_numpy(masks), "grid": grid}
        if self.matcher is not None:
            state["match"] = self.matcher.prepare(
                [Support.from_arrays(s.image, (s.mask > 0).astype(np.uint8)) for s in sup])
        return state

    def __call__(self, carry: Carry, state: State) -> None:
        """Paint the query and set ``carry.prob`` ((H, W) in [0, 1], query size); the painted RGB cell goes to
        ``carry.extras["painted"]`` ((h', w', 3) uint8) for inspection."""
        grid = int(state.get("grid", 1))
        palette = canvas.binary_palette()
        hint = None
        if self.matcher is not None:  # one prior from all supports, shown on every canvas of the ensemble
            hint = canvas.grey_image(self.matcher.similarity(carry.query, state["match"], carry.cache))
        rgb = self._paint_cell(carry.query, state["images"], state["masks"], palette, grid, carry.cache, hint)
        h, w = carry.query.shape[:2]
        carry.prob = canvas.binary_score(rgb, palette[0], palette[1], (h, w))
        carry.extras["painted"] = (rgb.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)

    # ------------------------------------------------------------------ multi-class in one pass
    def segment_labels(self, query: np.ndarray, supports: Sequence[Support],
                       temperature: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """Paint every class of multi-class supports at once with Painter's palette and decode the label map
        by nearest palette colour (one model pass instead of one per class).

        Args:
            query: (H, W, 3) uint8.
            supports: supports with label maps (0 = background).
            temperature: softmax temperature of the scores (see ``canvas.palette_scores``).

        Returns:
            labels: (H, W) uint8 label map in the supports' label values.
            scores: (C + 1, H, W) float32, index 0 = background, index i = i-th sorted support class.
        """
        if self.matcher is not None:
            raise InputError("painter: this checkpoint reads a binary matching prior; segment one class at a time")
        sup = list(supports)[: self.max_shots] if self.max_shots else list(supports)
        classes = sorted({c for s in sup for c in s.classes})
        if not classes:
            raise InputError("supports: every support mask is empty; mark the object in at least one mask")
        lut = np.zeros(256, np.uint8)
        lut[classes] = np.arange(1, len(classes) + 1)
        palette = canvas.painter_palette(len(classes))
        h, w = self.cell
        if self.ensemble == "spatial" and len(sup) > 1:
            images = canvas.tile([s.image for s in sup], (h, w), is_mask=False)[None]
            masks = canvas.tile([lut[s.mask] for s in sup], (h, w), is_mask=True)[None]
            grid = canvas.grid_side(len(sup))
        else:
            images = np.stack([canvas.resize_image(s.image, (h, w)) for s in sup])
            masks = np.stack([canvas.resize_labels(lut[s.mask], (h, w)) for s in sup])
            grid = 1
        rgb = self._paint_cell(query, torch.from_numpy(images), torch.from_numpy(masks), palette, grid, {})
        size = query.shape[:2]
        scores = canvas.palette_scores(rgb, palette, size, temperature)
        index = scores.argmax(0).cpu().numpy()
        values = np.array([0] + classes, np.uint8)
        return values[index], scores.cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------ internals
    def _paint_cell(self, query: np.ndarray, images: torch.Tensor, masks: torch.Tensor,
                    palette: np.ndarray, grid: int, cache: dict, hint: np.ndarray | None = None) -> torch.Tensor:
        h, w = self.cell
        key = f"painter.query.{h}x{w}.g{grid}"
        if key not in cache:  # shared by every class painted on this query
            cell = canvas.tile([query], (h, w), is_mask=False) if grid > 1 else \
                canvas.resize_image(query, (h, w))
            cache[key] = canvas.to_model(cell)
        colours = canvas.encode_mask(masks.cpu().numpy(), palette)
        if hint is not None:  # the grey prior is laid out exactly like the query cell
            hint = canvas.to_model(canvas.tile([hint], (h, w), is_mask=False) if grid > 1 else
                                   canvas.resize_image(hint, (h, w)))
        rgb = paint(self.model, cache[key], canvas.to_model(images.cpu().numpy()),
                    canvas.to_model(colours), self.embedding_type, hint)
        return canvas.untile_mean(rgb, grid) if grid > 1 else rgb


class PainterMethod(Pipeline):
    """``method=painter``: a ``Pipeline`` whose generate stage is a ``PainterStage`` (optionally followed by a
    refine stage), with the stage's settings at the top level so ``build("painter", checkpoint=...)`` works.

    Args:
        checkpoint, model_config, ensemble, max_shots, embedding_type: see ``PainterStage``.
        refine: optional refine stage (e.g. SAM prompted by the painted mask).
        name, device, retriever, shots, threshold: see ``Pipeline``.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_config: dict[str, Any] | None = None,
        ensemble: str = "feature",
        max_shots: int | None = None,
        embedding_type: str = "instance",
        refine: Any = None,
        name: str = "painter",
        device: str | torch.device = "cpu",
        retriever: Any = None,
        shots: int = 0,
        threshold: float = 0.5,
    ) -> None:
        stage = PainterStage(checkpoint=checkpoint, model_config=model_config, ensemble=ensemble,
                             max_shots=max_shots, embedding_type=embedding_type, device=device)
        super().__init__(name=name, device=device, retriever=retriever, shots=shots, generate=stage,
                         refine=refine, threshold=threshold)
