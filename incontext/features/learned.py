"""Patch features learned here: a small convolutional encoder trained to match a support's object to the same
class in a query (``configs/experiment/patch_encoder_tiny.yaml``, task :mod:`incontext.features.learned_task`).

It exists because the released DINOv2 weights can't be downloaded offline and Matcher needs patch features that
tell classes apart: the shipped SAM's image encoder was trained to segment, not to recognise, and matches the
wrong object (see the README). The encoder works on a square image of ``4 * grid`` pixels and returns one
feature per cell of a ``grid x grid`` map (stride 4), so at ``grid = 37`` it lays its features on the same
37 x 37 patch grid as DINOv2 ViT/14 at Matcher's 518 px.

Two faces of one model:
* :class:`LearnedFeatures` is a ``DenseFeatures`` extractor (``prototype``'s interface);
* :class:`LearnedPatchFeatures` has the members Matcher reads from DINOv2 (``patch_size``, ``normalize``,
  ``patch_tokens(...)["prenorm"]``).
Weights live in the Hugging Face layout (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from incontext.errors import InputError, WeightsNotFoundError

__all__ = ["LearnedFeatures", "LearnedPatchFeatures", "PatchEncoder", "PatchEncoderConfig",
           "build_learned_patch_features", "load_patch_encoder"]

SHIPPED_NAME = "patch_encoder_tiny"


@dataclass
class PatchEncoderConfig:
    """Architecture of :class:`PatchEncoder` (the project's own choices; no published source).

    Attributes:
        grid: output cells per side; the input side is ``4 * grid``.
        stem: channels of the full- and half-resolution convolutions.
        width: channels of the residual blocks at stride 4.
        dilations: one residual block per entry (3x3 convolutions with this dilation): they widen the receptive
            field to a whole object without further downsampling.
        dim: output feature channels.
    """

    grid: int = 37
    stem: tuple[int, int] = (24, 48)
    width: int = 64
    dilations: tuple[int, ...] = (1, 2, 4, 1)
    dim: int = 64
    model_type: str = field(default="incontext_patch_encoder")

    @property
    def input_size(self) -> int:
        return 4 * self.grid

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PatchEncoderConfig:
        """From config.json or a Hydra node (lists become the tuple fields)."""
        d = dict(raw)
        for k in ("stem", "dilations"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class _Residual(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm = nn.GroupNorm(8, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.norm(self.conv1(x))))


class PatchEncoder(nn.Module):
    """(B, 3, 4g, 4g) normalised images -> (B, dim, g, g) features (not normalised)."""

    def __init__(self, config: PatchEncoderConfig) -> None:
        super().__init__()
        self.config = config
        s1, s2 = config.stem
        self.stem = nn.Sequential(
            nn.Conv2d(3, s1, 3, padding=1), nn.GELU(),
            nn.Conv2d(s1, s2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(s2, config.width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.blocks = nn.Sequential(*[_Residual(config.width, d) for d in config.dilations])
        self.head = nn.Conv2d(config.width, config.dim, 1)
        # matching logit = scale * cosine + bias, learned with the encoder (see learned_task)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 255] -> the encoder's input range."""
        return (images / 255.0 - 0.5) / 0.25

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors in ``directory`` (each file written to a temp name, then renamed)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / ".config.json.tmp"
        tmp.write_text(json.dumps(asdict(self.config), indent=2))
        tmp.replace(d / "config.json")
        tmp = d / ".model.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(d / "model.safetensors")


def load_patch_encoder(folder: str | Path | None = None, device: str | torch.device = "cpu") -> PatchEncoder:
    """A :class:`PatchEncoder` from a Hugging Face style folder; ``None`` = the shipped ``patch_encoder_tiny``."""
    from safetensors.torch import load_file

    from incontext.backbones.weights import shipped

    if folder is None:
        folder = shipped(SHIPPED_NAME)
        if folder is None:
            raise WeightsNotFoundError(
                f"patch encoder: the shipped weights/{SHIPPED_NAME} folder is missing; rebuild it with "
                f"`python train.py experiment={SHIPPED_NAME}` and pass its checkpoints/best folder")
    d = Path(folder)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise WeightsNotFoundError(f"patch encoder: {d} needs config.json and model.safetensors "
                                   f"(a folder written by PatchEncoder.save_pretrained or train.py)")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") != "incontext_patch_encoder":
        raise InputError(f"patch encoder: {cfg_path} is not a patch-encoder config (model_type "
                         f"{raw.get('model_type')!r}); pass a folder written by train.py "
                         f"experiment={SHIPPED_NAME}")
    model = PatchEncoder(PatchEncoderConfig.from_dict(raw))
    try:
        model.load_state_dict(load_file(str(w_path)), strict=True)
    except RuntimeError as e:
        raise InputError(f"patch encoder: {w_path} does not fit {cfg_path}: {str(e).splitlines()[0]}") from e
    return model.eval().to(device)


def _square(image: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (side, side, 3), area-averaged when shrinking."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if side < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=interp)


class LearnedFeatures:
    """``DenseFeatures`` of a trained :class:`PatchEncoder`: (H, W, 3) uint8 -> (dim, grid, grid) unit vectors.

    The image is resized to the encoder's square input (the benchmarks' images are square; others are stretched,
    as Matcher's 518 x 518 resize does).
    """

    def __init__(self, model: PatchEncoder | str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.model = model if isinstance(model, PatchEncoder) else load_patch_encoder(model, device)
        self.device = torch.device(device)
        self.model.to(self.device)
        c = self.model.config
        self.name = f"learned_patches(grid={c.grid},dim={c.dim})"

    def to(self, device: str | torch.device) -> LearnedFeatures:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        side = self.model.config.input_size
        x = torch.from_numpy(_square(image, side)).permute(2, 0, 1)[None].float().to(self.device)
        return F.normalize(self.model(PatchEncoder.normalize(x))[0], dim=0)


class LearnedPatchFeatures:
    """A trained :class:`PatchEncoder` with the interface Matcher reads from DINOv2.

    Args:
        model: the encoder, a folder, or ``None`` for the shipped one.
        work_size: Matcher's square working size; ``work_size / patch_size`` must equal the encoder's grid.
        patch_size: Matcher's patch side in working pixels (14 = DINOv2 ViT/14).
    """

    def __init__(self, model: PatchEncoder | str | Path | None = None, work_size: int = 518, patch_size: int = 14,
                 device: str | torch.device = "cpu") -> None:
        self.model = model if isinstance(model, PatchEncoder) else load_patch_encoder(model, device)
        grid = self.model.config.grid
        if int(work_size) % int(patch_size) or int(work_size) // int(patch_size) != grid:
            raise InputError(f"LearnedPatchFeatures: work_size={work_size} / patch_size={patch_size} must give the "
                             f"encoder's {grid} x {grid} grid")
        self.patch_size, self.work_size, self.grid = int(patch_size), int(work_size), grid
        self.embed_dim = self.model.config.dim
        self.name = f"learned_patches(grid={grid},dim={self.embed_dim})"

    def to(self, device: str | torch.device) -> LearnedPatchFeatures:
        self.model.to(device)
        return self

    def normalize(self, images: Any) -> torch.Tensor:
        """(B, S, S, 3) uint8 (array or tensor) -> (B, 3, 4g, 4g) encoder input."""
        arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"LearnedPatchFeatures.normalize: images {arr.shape} {arr.dtype}; expected "
                             f"(B, S, S, 3) uint8")
        side = self.model.config.input_size
        x = np.stack([_square(a, side) for a in arr])
        dev = next(self.model.parameters()).device
        return PatchEncoder.normalize(torch.from_numpy(x).permute(0, 3, 1, 2).float().to(dev))

    @torch.inference_mode()
    def patch_tokens(self, x: torch.Tensor, batch_size: int = 8, block: int | None = None) -> dict[str, torch.Tensor]:
        """{"prenorm", "normed"}: (B, grid * grid, dim) row-major tokens (Matcher L2-normalises them itself)."""
        outs = [self.model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        t = torch.cat(outs).flatten(2).transpose(1, 2).contiguous()
        return {"prenorm": t, "normed": t}


def build_learned_patch_features(weights: str | Path | None = None, work_size: int = 518, patch_size: int = 14,
                                 device: str | torch.device = "cpu",
                                 weights_key: str | None = None) -> LearnedPatchFeatures:
    """Config entry point of ``configs/backbone/learned_patches.yaml``: ``weights`` = a trained folder, ``None``
    = the shipped ``patch_encoder_tiny`` (``weights_key`` is accepted for drop-in use in a DINOv2 slot)."""
    return LearnedPatchFeatures(weights, work_size=work_size, patch_size=patch_size, device=device)
