"""Dense feature extractors shared by match stages and retrieval: image (H, W, 3) uint8 -> (C, h, w) grid."""

from incontext.features.base import DenseFeatures, pool_mask
from incontext.features.handcrafted import HandcraftedFeatures

__all__ = ["DenseFeatures", "HandcraftedFeatures", "pool_mask"]
