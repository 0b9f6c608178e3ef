"""The dense-feature protocol and mask pooling onto a feature grid."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F


@runtime_checkable
class DenseFeatures(Protocol):
    """Maps an image to a feature grid.

    ``__call__(image)`` takes (H, W, 3) uint8 RGB and returns (C, h, w) float32 on ``self.device``; ``name``
    identifies the extractor and its settings (used to key caches and to refuse mixing embeddings).
    """

    name: str

    def __call__(self, image: np.ndarray) -> torch.Tensor: ...


def pool_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by a 0/1 mask: (H, W) -> (h, w) float in [0, 1] (area pooling)."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool2d(m, size)[0, 0]
