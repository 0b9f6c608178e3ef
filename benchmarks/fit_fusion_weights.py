"""Fit the generalist's fusion weights on the procedural benchmark's TRAIN classes (never the test classes).

    python benchmarks/fit_fusion_weights.py --episodes 200 --shots 1
    python benchmarks/fit_fusion_weights.py --set generate.generators.diffusion.checkpoint=runs/x/last \
        --member painter=runs/painter_tiny/checkpoints/last --refine-variants

Runs the preset's match stage and every generate member once per TRAIN episode (episodes 0..N-1, seed 1000 +
seed, so the list differs from the evaluation's seed 0 anyway), keeps their probability maps, then scores every
weighting on a simplex grid (step ``--step``; the match stage's own map is one more member, ``match``) by mIoU
over classes (HSNet protocol, ``incontext.metrics.SegmentationMeter``) of ``fused > 0.5``. The best few weightings
are then scored again after the preset's SAM refine stage (the query's SAM embedding is computed once and
reused), and ``--refine-variants`` also scores a few refine settings on the best weighting.

Prints Markdown and the YAML line to paste into ``configs/method/generalist.yaml`` (``generate.weights``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from incontext.data.synthetic import SyntheticBenchmark  # noqa: E402
from incontext.metrics import SegmentationMeter  # noqa: E402
from incontext.pipeline import Carry  # noqa: E402
from incontext.registry import build  # noqa: E402


def simplex(names: list[str], step: float) -> list[dict[str, float]]:
    n = int(round(1 / step))
    out = []
    for parts in itertools.product(range(n + 1), repeat=len(names)):
        if sum(parts) == n:
            out.append({k: p / n for k, p in zip(names, parts)})
    return out


def miou(preds: list[np.ndarray], gts: list[np.ndarray], classes: list[int]) -> float:
    meter = SegmentationMeter(classes=None, ignore_index=255, boundary=False)
    for p, g, c in zip(preds, gts, classes):
        meter.update(p, g, c)
    return float(meter.summary()["miou"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="generalist")
    ap.add_argument("--set", action="append", default=[], help="Hydra override inside the method")
    ap.add_argument("--member", action="append", default=[],
                    help="extra painter member NAME=CHECKPOINT (a PainterStage)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--top", type=int, default=4, help="weightings re-scored with the refine stage")
    ap.add_argument("--refine-variants", action="store_true")
    ap.add_argument("--hflip", action="store_true", help="members also run on the mirrored query (averaged)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    overrides = list(a.set) + ["retriever=null"]
    for spec in a.member:
        name, ckpt = spec.split("=", 1)
        overrides.append(f"+generate.generators.{name}={{_target_:incontext.generate.painter.PainterStage,"
                         f"checkpoint:{ckpt}}}")
    m = build(a.method, overrides)
    match, fuse, refine = m.stages.get("match"), m.stages["generate"], m.stages.get("refine")
    bench = SyntheticBenchmark(split="train", size=a.size, shots=a.shots, episodes=a.episodes, seed=1000 + a.seed)
    names = list(fuse.generators) + (["match"] if match is not None else [])
    fuse.weights = {n: 1.0 for n in names}  # every member runs; the weights are chosen below
    if a.hflip:
        fuse.hflip = True
    maps: dict[str, list[np.ndarray]] = {n: [] for n in names}
    gts, classes, queries, caches = [], [], [], []
    t0 = time.time()
    with torch.inference_mode():
        for i in range(len(bench)):
            s = bench[i]
            sup = [x.binary(1) for x in s.episode.supports]
            carry = Carry(query=s.episode.query, cache={})
            if match is not None:
                match(carry, match.prepare(sup))
            probs, _ = fuse.member_maps(carry, fuse.prepare(sup))
            for name in names:
                maps[name].append(probs[name].float().cpu().numpy().astype(np.float16))
            gt = (s.target == 1).astype(np.uint8)
            gt[s.target == 255] = 255
            gts.append(gt)
            classes.append(int(s.classes[0]))
            queries.append(s.episode.query)
            caches.append({})
    print(f"{len(bench)} train episodes, members {names}, {time.time() - t0:.0f} s", file=sys.stderr)

    def fused(w: dict[str, float], i: int) -> np.ndarray:
        tot = sum(w.values())
        return sum(w[n] / tot * maps[n][i].astype(np.float32) for n in names if w.get(n, 0) > 0)

    def refined(w: dict[str, float], stage=refine) -> float:
        preds = []
        for i in range(len(gts)):
            c = Carry(query=queries[i], cache=caches[i], prob=torch.from_numpy(fused(w, i)))
            stage(c, {})
            preds.append(c.mask.numpy())
        return miou(preds, gts, classes)

    scored = []
    for w in simplex(names, a.step):
        if sum(w.values()) == 0:
            continue
        scored.append((miou([fused(w, i) > 0.5 for i in range(len(gts))], gts, classes), w))
    scored.sort(key=lambda x: -x[0])
    alone = {n: next(s for s, w in scored if w[n] == 1.0) for n in names}
    print(f"\n| weighting ({', '.join(names)}) | mIoU fused | mIoU fused + refine |")
    print("|---|---|---|")
    rows = [(f"{n} alone", {k: float(k == n) for k in names}) for n in names]
    rows.append(("equal", {n: 1.0 for n in names if n != "match"}))
    rows += [(f"best #{j + 1}", w) for j, (_, w) in enumerate(scored[: a.top])]
    best = (-1.0, None)
    with torch.inference_mode():
        for label, w in rows:
            f = miou([fused(w, i) > 0.5 for i in range(len(gts))], gts, classes)
            r = refined(w) if refine is not None else float("nan")
            if r > best[0]:
                best = (r, w)
            print(f"| {label} {', '.join(f'{w.get(n, 0):.1f}' for n in names)} | {f:.1f} | {r:.1f} |")
        print(f"\nmembers alone (fused, no refine): {', '.join(f'{n} {v:.1f}' for n, v in alone.items())}")
        w = best[1]
        print("\ngenerate.weights: {" + ", ".join(f"{n}: {w.get(n, 0):.2f}" for n in names) + "}"
              f"   # fitted on {len(gts)} TRAIN episodes, {a.shots}-shot, mIoU {best[0]:.1f} after refine")
        if a.refine_variants and refine is not None:
            print("\n| refine variant (best weighting) | mIoU |\n|---|---|")
            base = dict(threshold=refine.threshold, min_agreement=refine.min_agreement,
                        mask_prompt=refine.mask_prompt, box=refine.box, point=refine.point)
            variants = [("as configured", {}), ("no mask prompt", {"mask_prompt": False}),
                        ("no box", {"box": False}), ("no point", {"point": False}),
                        ("min_agreement 0.5", {"min_agreement": 0.5}), ("min_agreement 0.1", {"min_agreement": 0.1}),
                        ("threshold 0.4", {"threshold": 0.4}), ("threshold 0.6", {"threshold": 0.6}),
                        ("min_pred_iou 0.5", {"min_pred_iou": 0.5}), ("drop_small", {"drop_small": True}),
                        ("multimask", {"multimask": True}), ("multimask, threshold 0.4", {"multimask": True,
                                                                                       "threshold": 0.4})]
            for label, ch in variants:
                for k, v in {**base, **ch}.items():
                    setattr(refine, k, v)
                refine.min_pred_iou = ch.get("min_pred_iou", 0.0)
                refine.drop_small = ch.get("drop_small", False)
                refine.multimask = ch.get("multimask", False)
                print(f"| {label} | {refined(w):.1f} |")


if __name__ == "__main__":
    main()
