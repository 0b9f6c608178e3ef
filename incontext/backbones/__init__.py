"""Backbones: DINOv2 (``dinov2``), SAM (``sam``), the known-weights table (``weights``), feature cache (``cache``).

Submodules are imported explicitly (``from incontext.backbones.dinov2 import build_dinov2``) so that using one
backbone does not import the others' libraries.
"""
