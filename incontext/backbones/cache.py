"""Feature cache: encode a support used by many queries once.

:class:`FeatureCache` is an in-memory LRU of ``{name: tensor}`` dicts keyed by (SHA-256 of the image content,
backbone id, resolution), with an optional on-disk layer (one ``.safetensors`` file per entry, written
atomically) for benchmark runs that revisit the same images across processes. Helpers
:func:`cached_dino_tokens` and :func:`cached_sam_embedding` wire it to the two backbones.

Cached tensors are shared, not copied: treat what ``get`` returns as read-only.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from incontext.errors import InputError

__all__ = ["CacheKey", "FeatureCache", "image_digest", "cached_dino_tokens", "cached_sam_embedding"]


def image_digest(image: np.ndarray | bytes) -> str:
    """SHA-256 of an image's content: raw file bytes, or a decoded array's shape, dtype and C-order bytes.

    Two arrays with the same pixels get the same digest whatever their memory layout; the shape is part of
    the digest so that equal bytes with different shapes do not collide.
    """
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes:")
        h.update(bytes(image))
        return h.hexdigest()
    a = np.asarray(image)
    h.update(f"array:{a.dtype.str}:{a.shape}:".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """(image digest, backbone id, resolution); ``resolution`` is e.g. ``"518x518"`` or ``"sam1024"``."""

    digest: str
    backbone: str
    resolution: str

    def filename(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", f"{self.backbone}__{self.resolution}")
        return f"{safe}__{self.digest}.safetensors"


class FeatureCache:
    """LRU cache of tensor dicts, optionally backed by a directory of safetensors files.

    Args:
        max_items: entries kept in memory (least recently used evicted first); 0 disables the memory layer.
        max_bytes: optional bound on the memory layer's tensor bytes.
        disk_dir: optional directory for the on-disk layer (created if missing); entries evicted from memory
            stay on disk and are reloaded on a later miss.
    """

    def __init__(self, max_items: int = 64, *, max_bytes: int | None = None, disk_dir: str | os.PathLike | None = None):
        if max_items < 0:
            raise InputError(f"FeatureCache: max_items={max_items} must be >= 0")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[CacheKey, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    @staticmethod
    def key(image: np.ndarray | bytes, backbone: str, resolution: int | tuple[int, int] | str) -> CacheKey:
        """Key of ``image`` encoded by backbone ``backbone`` (its id, e.g. ``DinoFeatures.name``) at ``resolution``."""
        if isinstance(resolution, int):
            res = f"{resolution}x{resolution}"
        elif isinstance(resolution, tuple):
            res = "x".join(str(int(v)) for v in resolution)
        else:
            res = str(resolution)
        return CacheKey(image_digest(image), str(backbone), res)

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._mem or (self.disk_dir is not None and (self.disk_dir / key.filename()).is_file())

    def get(self, key: CacheKey) -> dict[str, torch.Tensor] | None:
        """Cached tensors for ``key`` (memory, then disk) or None; counts hits and misses."""
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if self.disk_dir is not None:
            path = self.disk_dir / key.filename()
            if path.is_file():
                from safetensors.torch import load_file

                value = load_file(str(path))
                self.disk_hits += 1
                self._remember(key, value)
                return value
        self.misses += 1
        return None

    def put(self, key: CacheKey, value: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``value`` (``{name: tensor}``) in memory and, if configured, on disk; return the stored dict."""
        if not value or not all(isinstance(v, torch.Tensor) for v in value.values()):
            raise InputError("FeatureCache.put: value must be a non-empty dict of tensors")
        value = dict(value)
        self._remember(key, value)
        if self.disk_dir is not None:
            from safetensors.torch import save_file

            from incontext.io import atomic_path

            path = self.disk_dir / key.filename()
            with atomic_path(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in value.items()}, str(tmp),
                          metadata={"backbone": key.backbone, "resolution": key.resolution, "digest": key.digest})
        return value

    def get_or_compute(
        self, key: CacheKey, compute: Callable[[], Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Cached value for ``key``, else ``compute()`` stored under ``key``."""
        value = self.get(key)
        if value is None:
            value = self.put(key, compute())
        return value

    def clear(self) -> None:
        """Drop the memory layer (the disk layer is left alone)."""
        self._mem.clear()
        self._bytes = 0

    def _remember(self, key: CacheKey, value: dict[str, torch.Tensor]) -> None:
        if self.max_items == 0:
            return
        if key in self._mem:
            self._bytes -= _nbytes(self._mem.pop(key))
        self._mem[key] = value
        self._bytes += _nbytes(value)
        while len(self._mem) > self.max_items or (
            self.max_bytes is not None and self._bytes > self.max_bytes and len(self._mem) > 1
        ):
            _, old = self._mem.popitem(last=False)
            self._bytes -= _nbytes(old)


def _nbytes(value: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in value.values())


def cached_dino_tokens(
    cache: FeatureCache, feats, image: np.ndarray, size: int | tuple[int, int] = 518, block: int = -1
) -> dict[str, torch.Tensor]:
    """``feats.patch_tokens`` of one uint8 image resized to ``size`` (see ``DinoFeatures.preprocess``), cached.

    Returns ``prenorm``/``normed`` (N, C) and ``cls``/``cls_normed`` (C,) for the single image.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    key = FeatureCache.key(image, f"{feats.name}#block{block}", hw)

    def compute() -> dict[str, torch.Tensor]:
        out = feats.patch_tokens(feats.preprocess(image, size=hw), block=block)
        return {k: v[0] for k, v in out.items()}

    return cache.get_or_compute(key, compute)


def cached_sam_embedding(cache: FeatureCache, predictor, image: np.ndarray):
    """``predictor.embed(image)`` cached, and made the predictor's current image either way.

    Returns the ``SamEmbedding``; on a hit no encoder pass runs (``predictor.set_embedding``).
    """
    from incontext.backbones.sam import SamEmbedding

    key = FeatureCache.key(image, predictor.name, f"sam{predictor.model.image_encoder.img_size}")

    def compute() -> dict[str, torch.Tensor]:
        emb = predictor.embed(image)
        return {
            "features": emb.features,
            "original_size": torch.tensor(emb.original_size),
            "input_size": torch.tensor(emb.input_size),
        }

    value = cache.get_or_compute(key, compute)
    emb = SamEmbedding(
        value["features"], tuple(int(v) for v in value["original_size"]), tuple(int(v) for v in value["input_size"])
    )
    predictor.set_embedding(emb)
    return emb
