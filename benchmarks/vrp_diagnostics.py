"""Diagnostics of a VRP head on the frozen SAM: where does the learned-prompt pipeline lose accuracy?

    python benchmarks/vrp_diagnostics.py --episodes 20          # shipped weights/vrp_tiny on sam_tiny_synthetic

Prints mean IoU (x 100, per episode, 224 px test-split episodes, seed 0) of the query's target for:

* ``head``: the head with the episode's support (what ``method=vrp`` does, 1 shot, mask annotation);
* ``head, support = query``: the head given the query itself as its support (an upper bound of the matching
  part: the prior is 1 on the target);
* ``free tokens``: ``num_queries`` prompt tokens optimised for this one image by Adam (lr 3e-2, ``--steps``)
  against its true mask, decoded exactly as the head's tokens are (SAM frozen): can the frozen decoder be driven
  to this mask by sparse tokens at all?
* ``1 click``: SAM's own point prompt at the centre of the target's largest component (single-mask output).

For a ``prior_click`` head (the shipped one since issue 12) also:

* ``head's click only``: the head's click (at its location map's maximum) without the learned tokens;
* ``location max on target (%)``: how often that click's cell lies on the target (cell coverage >= 0.5).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from incontext.backbones.sam_shipped import build_shipped_sam
from incontext.data.synthetic import SyntheticBenchmark
from incontext.refine.sam_refine import center_point
from incontext.refine.vrp import VRP, bce_dice_loss


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    u = (pred | gt).sum()
    return float((pred & gt).sum() / u) if u else 1.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="VRP head folder (default: the shipped weights/vrp_tiny)")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150, help="Adam steps of the free-token fit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    method = VRP(build_shipped_sam(), checkpoint=args.checkpoint)
    model = method.model.eval()
    sam = model.sam
    bench = SyntheticBenchmark(split="test", size=224, shots=1, episodes=args.episodes, seed=0)
    rows: dict[str, list[float]] = {"head": [], "head, support = query": [], "free tokens": [], "1 click": []}
    if model.head.config.prior_click:
        rows |= {"head's click only": [], "location max on target (%)": []}
    for i in range(args.episodes):
        ep = bench.episode(i)
        q, gt = ep.episode.query, ep.target == 1
        size = gt.shape
        rows["head"].append(_iou(method.segment(q, ep.episode.supports).mask == 1, gt))
        rows["head, support = query"].append(_iou(method.segment(q, [(q, gt.astype(np.uint8))]).mask == 1, gt))
        x = torch.from_numpy(q).permute(2, 0, 1)[None].float()
        _, emb = model.encode(x)
        tgt = torch.from_numpy(gt.astype(np.float32))[None, None]
        if model.head.config.prior_click:
            s_img = torch.from_numpy(ep.episode.supports[0].image).permute(2, 0, 1)[None].float()
            s_ann = torch.from_numpy((ep.episode.supports[0].mask > 0).astype(np.float32))[None, None]
            with torch.no_grad():
                maps, _ = model.encode(x)
                _, loc = model.prompts(maps, [model.support_side(s_img, s_ann)], with_location=True)
                logits = F.interpolate(model.decode(emb, model.click(loc)), size, mode="bilinear",
                                       align_corners=False)
            rows["head's click only"].append(_iou(logits[0, 0].numpy() > 0, gt))
            cover = F.adaptive_avg_pool2d(tgt, loc.shape[-2:]).flatten()
            rows["location max on target (%)"].append(float(cover[loc.flatten().argmax()] >= 0.5))
        torch.manual_seed(i)
        tok = torch.randn(1, model.head.config.num_queries, model.head.config.hidden, requires_grad=True)
        opt = torch.optim.Adam([tok], 3e-2)
        for _ in range(args.steps):
            logits = F.interpolate(model.decode(emb, tok), size, mode="bilinear", align_corners=False)
            bce, dice = bce_dice_loss(logits, tgt)
            opt.zero_grad()
            (bce + dice).backward()
            opt.step()
        with torch.no_grad():
            logits = F.interpolate(model.decode(emb, tok), size, mode="bilinear", align_corners=False)
        rows["free tokens"].append(_iou(logits[0, 0].numpy() > 0, gt))
        lab, n = ndimage.label(gt)
        if n:
            largest = lab == 1 + int(np.argmax(ndimage.sum(gt, lab, range(1, n + 1))))
            cx, cy = center_point(largest.astype(np.uint8))
            s = sam.image_encoder.img_size
            pt = torch.tensor([[[cx * s / size[1], cy * s / size[0]]]], dtype=torch.float32)
            with torch.no_grad():
                sparse, _ = sam.prompt_encoder(points=(pt, torch.ones(1, 1, dtype=torch.int)), boxes=None, masks=None)
                logits = F.interpolate(model.decode(emb, sparse), size, mode="bilinear", align_corners=False)
            rows["1 click"].append(_iou(logits[0, 0].numpy() > 0, gt))
    print(f"checkpoint: {method.checkpoint}; {args.episodes} test episodes (seed 0), mean per-episode IoU x 100")
    for k, v in rows.items():
        print(f"  {k:28s} {100 * np.mean(v):6.1f}")


if __name__ == "__main__":
    main()
