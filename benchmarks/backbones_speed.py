"""Build the full-size backbones with random weights and time one forward each; prints a table.

    .venv/bin/python benchmarks/backbones_speed.py                  # all (ViT-g / SAM ViT-H take minutes)
    .venv/bin/python benchmarks/backbones_speed.py --only dinov2_vits14 sam_vit_b --threads 2

DINOv2: one 518x518 image through ``DinoFeatures.patch_tokens`` (37x37 tokens). SAM: ``set_image`` of one
518x518 image (encoder at 1024x1024) and one ``decode`` of 64 single-point prompt sets (multimask). Weights are
random (``weights=random``), built by the same code path as the configs in ``configs/backbone``; this measures
architecture cost only. The device is printed; times are wall-clock seconds of a single run after build.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from incontext.backbones import build_backbone

DINO = ["dinov2_tiny", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"]
SAM = ["sam_tiny", "sam_vit_b", "sam_vit_l", "sam_vit_h"]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(name: str, device: str, image: np.ndarray) -> str:
    build_s = None
    t = time.perf_counter()
    model = build_backbone(name, weights="random", device=device)
    build_s = time.perf_counter() - t
    if name.startswith("dinov2"):
        n_params = sum(p.numel() for p in model.parameters())
        x = model.normalize(image[None])
        fwd = _time(lambda: model.patch_tokens(x))
        return f"{name:<15} {n_params / 1e6:9.1f}M  build {build_s:7.2f}s  forward(518^2) {fwd:7.2f}s"
    n_params = sum(p.numel() for p in model.model.parameters())
    enc = _time(lambda: model.set_image(image))
    pts = np.random.default_rng(0).uniform(0, 518, size=(64, 1, 2))
    dec = _time(lambda: model.decode(pts))
    return (
        f"{name:<15} {n_params / 1e6:9.1f}M  build {build_s:7.2f}s  encode(1024^2) {enc:7.2f}s  "
        f"decode(64 sets x 3 masks) {dec:7.2f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {DINO + SAM}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or DINO + SAM
    unknown = sorted(set(names) - set(DINO + SAM))
    if unknown:
        raise SystemExit(f"unknown names {unknown}; choose from {DINO + SAM}")
    image = np.random.default_rng(0).integers(0, 256, size=(518, 518, 3), dtype=np.uint8)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} {platform.processor()}")
    for name in names:
        print(run(name, args.device, image), flush=True)


if __name__ == "__main__":
    main()
