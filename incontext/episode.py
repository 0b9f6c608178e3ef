"""The episode interface: supports, queries, predictions and saved contexts.

Every input is normalised once, on construction, into one canonical form:

* images: ``np.ndarray`` (H, W, 3) ``uint8`` RGB, at the size the image is displayed (EXIF applied);
* masks: ``np.ndarray`` (H, W) ``uint8`` label map, 0 = background, 1..C = classes (binary masks are 0/1).

Methods never see paths, PIL images or torch tensors from the user; they see these arrays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from incontext.errors import InputError

IGNORE_LABEL = 255  # PASCAL VOC marks object borders with 255: neither object nor background

ImageLike = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray | torch.Tensor
MaskLike = Any


def _as_image(src: ImageLike, name: str) -> np.ndarray:
    from incontext.io import read_image

    return read_image(src, name=name)


def _as_mask(src: MaskLike, name: str) -> np.ndarray:
    from incontext.io import read_mask

    return read_mask(src, name=name)


def _source_name(src: Any) -> str | None:
    return str(src) if isinstance(src, (str, os.PathLike)) else None


@dataclass(frozen=True, init=False)
class Support:
    """One (image, mask) example of the concept to segment.

    Args:
        image: path, bytes, PIL image, numpy (H, W, 3) uint8 or torch (3, H, W) float in [0, 1].
        mask: path, PIL, numpy or torch; binary (0/1, 0/255, bool) or an integer label map.
        resize_masks: resize a mask whose size differs from its image (nearest neighbour) instead of
            refusing it.
        name: a label for messages (defaults to the image path when one is given).
        allow_empty: accept an all-background mask (used by bank entries and negative examples).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8 label map.
    """

    image: np.ndarray
    mask: np.ndarray
    name: str | None

    def __init__(
        self,
        image: ImageLike,
        mask: MaskLike,
        resize_masks: bool = False,
        name: str | None = None,
        allow_empty: bool = False,
    ) -> None:
        from incontext.io import check_mask_matches_image, check_nonempty

        label = name or _source_name(image) or "support"
        img = _as_image(image, f"{label}: image")
        msk = _as_mask(mask, f"{label}: mask")
        msk = check_mask_matches_image(msk, img, name=label, resize=resize_masks)
        if not allow_empty:
            check_nonempty(msk, name=f"{label}: mask")
        object.__setattr__(self, "image", img)
        object.__setattr__(self, "mask", msk)
        object.__setattr__(self, "name", label)

    @classmethod
    def from_arrays(cls, image: np.ndarray, mask: np.ndarray, name: str | None = None) -> "Support":
        """Wrap arrays already in canonical form without re-validating them (internal fast path)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "image", image)
        object.__setattr__(obj, "mask", mask)
        object.__setattr__(obj, "name", name)
        return obj

    @property
    def classes(self) -> list[int]:
        """Sorted labels present in the mask; background (0) and the ignore label (255, PASCAL's object
        borders) excluded."""
        return [int(c) for c in np.unique(self.mask) if c not in (0, IGNORE_LABEL)]

    def binary(self, label: int) -> "Support":
        """This support with a 0/1 mask of one class."""
        return Support.from_arrays(self.image, (self.mask == label).astype(np.uint8), self.name)


def _as_support(item: Any, index: int, resize_masks: bool) -> Support:
    if isinstance(item, Support):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Support(item[0], item[1], resize_masks=resize_masks, name=f"support {index}")
    if isinstance(item, dict) and {"image", "mask"} <= set(item):
        return Support(item["image"], item["mask"], resize_masks=resize_masks, name=f"support {index}")
    raise InputError(
        f"supports[{index}]: expected Support, (image, mask) or {{'image', 'mask'}}, got "
        f"{type(item).__name__}; pass pairs such as [(image, mask), ...]"
    )


def as_supports(supports: Iterable[Any] | None, resize_masks: bool = False) -> list[Support]:
    """Normalise a user's supports (Support objects, (image, mask) pairs or dicts) to ``Support``s."""
    if supports is None:
        return []
    if isinstance(supports, Support):
        return [supports]
    return [_as_support(s, i, resize_masks) for i, s in enumerate(supports)]


@dataclass(frozen=True, init=False)
class Episode:
    """A query and its supports.

    Args:
        query: the image to segment (any form ``Support`` accepts).
        supports: ``Support`` objects or (image, mask) pairs; may be empty when a retriever fills them.
        resize_masks: forwarded to each support.
    """

    query: np.ndarray
    supports: list[Support]
    query_name: str | None

    def __init__(
        self, query: ImageLike, supports: Sequence[Any] = (), resize_masks: bool = False
    ) -> None:
        qname = _source_name(query) or "query"
        object.__setattr__(self, "query", _as_image(query, qname))
        object.__setattr__(self, "supports", as_supports(supports, resize_masks))
        object.__setattr__(self, "query_name", qname)

    @property
    def classes(self) -> list[int]:
        """Sorted union of the supports' labels."""
        return sorted({c for s in self.supports for c in s.classes})


@dataclass
class Instance:
    """One predicted object.

    Attributes:
        mask: (H, W) bool at the query's original size.
        score: the method's confidence for this instance.
        label: the class it belongs to.
    """

    mask: np.ndarray
    score: float
    label: int = 1


@dataclass
class Prediction:
    """What a segmenter returns for one query.

    Attributes:
        mask: (H, W) uint8 label map at the query's original size (0/1 for one class).
        scores: per class, (H, W) float32 foreground probability in [0, 1].
        instances: optional selected instance masks with scores.
        extras: named diagnostics (points used, timings, stage scores, ...).
    """

    mask: np.ndarray
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    instances: list[Instance] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def foreground(self) -> np.ndarray:
        """(H, W) bool: any class."""
        return self.mask > 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


CONTEXT_FORMAT = "incontext.context/1"


@dataclass
class Context:
    """Everything a method derived from the supports alone, reusable for many queries.

    Attributes:
        method: the name of the method that prepared it; ``segment`` refuses a context of another method.
        tensors: named tensors (features, prototypes, fitted weights); saved with safetensors.
        meta: JSON-able settings and bookkeeping (classes, sizes, config digest).
    """

    method: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.safetensors`` file (tensors, and the JSON meta in its header), atomically."""
        from safetensors.torch import save_file

        from incontext.io import atomic_path

        path = Path(path)
        header = {
            "format": CONTEXT_FORMAT,
            "method": self.method,
            "meta": json.dumps(_jsonable(self.meta), sort_keys=True),
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Context":
        """Read a context written by ``save`` (never unpickles anything)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"context: no file at {path}; pass the path written by Context.save")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several types for corrupt files
            raise InputError(
                f"context: {path} is not a readable safetensors file ({err}); "
                "re-create it with Context.save"
            ) from None
        if header.get("format") != CONTEXT_FORMAT:
            raise InputError(
                f"context: {path} is a safetensors file but not an incontext context "
                f"(format={header.get('format')!r}); re-create it with Context.save"
            )
        return cls(header["method"], tensors, json.loads(header.get("meta", "{}")))

    def subset(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix`` (e.g. ``"c1."``), with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix)}
