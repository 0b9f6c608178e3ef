"""Calibration of the diffusion mask generator: is its foreground probability honest, and are its uncertain
pixels where its errors are?

    python benchmarks/diffusion_calibration.py                       # shipped checkpoint, 200 episodes
    python benchmarks/diffusion_calibration.py --episodes 500 --shots 1 5 --json out/calib.json

On procedural test episodes (224 px, seed 0, the evaluate command's episodes), for each sampler setting
(steps, n_samples), every query pixel gives (p = foreground probability, error = (p > 0.5) != truth, u =
uncertainty). Reported, pooled over all pixels of all episodes:

* ECE: expected calibration error of p, 15 equal-width bins over [0, 1] (Guo et al. 2017):
  sum_b |B_b| / N * |mean(truth in B_b) - mean(p in B_b)|, in percent;
* pixel error rate overall, and in the 10 % most uncertain pixels (entropy of the mean probability; and the
  samples' std when n_samples >= 2), with the share of all errors those pixels hold;
* AUROC of u as a detector of errors (0.5 = uncertainty says nothing about where errors are).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

BINS = 15


def ece(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error (percent) of probabilities ``p`` for 0/1 outcomes ``y``."""
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    conf = np.bincount(idx, weights=p, minlength=bins)
    acc = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    nz = n > 0
    return float(100.0 * np.sum(np.abs(acc[nz] - conf[nz])) / len(p))


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for boolean ``label`` (rank formula, ties averaged)."""
    from scipy.stats import rankdata

    pos = label.sum()
    neg = len(label) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def top_uncertain(u: np.ndarray, err: np.ndarray, frac: float = 0.1) -> tuple[float, float]:
    """Error rate among the ``frac`` most uncertain pixels, and the share of all errors they hold."""
    k = max(1, int(round(frac * len(u))))
    top = np.argpartition(-u, k - 1)[:k]
    return float(err[top].mean()), float(err[top].sum() / max(err.sum(), 1))


def run(model, shots: int, episodes: int, settings: list[tuple[int, int]], seed: int,
        pixel_stride: int) -> list[dict]:
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate.diffusion import DiffusionMethod

    bench = SyntheticBenchmark(split="test", size=224, shots=shots, episodes=episodes, seed=seed)
    methods = {(s, n): DiffusionMethod(model=model, steps=s, n_samples=n,
                                       uncertainty="std" if n > 1 else "entropy") for s, n in settings}
    acc = {k: {"p": [], "y": [], "ent": [], "std": [], "inter": 0, "union": 0} for k in settings}
    from incontext.generate.diffusion import binary_entropy

    for i in range(episodes):
        sample = bench[i]
        ep = sample.episode
        truth = sample.target == 1
        keep = np.zeros_like(truth)
        keep[::pixel_stride, ::pixel_stride] = True  # a regular subsample keeps memory small at 500 episodes
        for key, method in methods.items():
            ctx = method.prepare(ep.supports)
            pred = method.segment(ep.query, ctx)
            p = pred.scores[1]
            a = acc[key]
            a["p"].append(p[keep])
            a["y"].append(truth[keep])
            a["ent"].append(binary_entropy(torch.from_numpy(p)).numpy()[keep])
            if key[1] > 1:
                a["std"].append(pred.extras["uncertainty"][keep])
            m = p > 0.5
            a["inter"] += int((m & truth).sum())
            a["union"] += int((m | truth).sum())
    rows = []
    for (steps, n), a in acc.items():
        p, y = np.concatenate(a["p"]), np.concatenate(a["y"])
        err = (p > 0.5) != y
        row = {"shots": shots, "steps": steps, "n_samples": n, "episodes": episodes, "pixels": int(len(p)),
               "pooled_iou": 100.0 * a["inter"] / max(a["union"], 1), "ece": ece(p, y),
               "error_rate": 100.0 * float(err.mean())}
        for kind in ("ent", "std"):
            if not a[kind]:
                continue
            u = np.concatenate(a[kind])
            rate, share = top_uncertain(u, err)
            row[f"{kind}_top10_error_rate"] = 100.0 * rate
            row[f"{kind}_top10_error_share"] = 100.0 * share
            row[f"{kind}_auroc"] = auroc(u, err)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped one)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--shots", type=int, nargs="+", default=[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pixel-stride", type=int, default=2, help="use every n-th pixel in each direction")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from incontext.generate.diffusion import DEFAULT_CHECKPOINT, load_diffusion

    path = args.checkpoint or DEFAULT_CHECKPOINT
    model = load_diffusion(path)
    settings = [(1, 1), (2, 1), (4, 1), (2, 4)]
    rows = []
    for shots in args.shots:
        rows += run(model, shots, args.episodes, settings, args.seed, args.pixel_stride)
    print(f"# diffusion calibration — {path}; synthetic test, 224 px, seed {args.seed}, "
          f"{args.episodes} episodes, every {args.pixel_stride}th pixel; load average {os.getloadavg()[0]:.1f}\n")
    print("| shots | steps | samples | pooled IoU | ECE (%) | pixel error (%) | error in top-10 % entropy (%) "
          "| errors caught (%) | AUROC (entropy) | error in top-10 % std (%) | AUROC (std) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda r, k, nd=1: f"{r[k]:.{nd}f}" if k in r else "–"  # noqa: E731
    for r in rows:
        print(f"| {r['shots']} | {r['steps']} | {r['n_samples']} | {f(r, 'pooled_iou')} | {f(r, 'ece', 2)} | "
              f"{f(r, 'error_rate', 2)} | {f(r, 'ent_top10_error_rate')} | {f(r, 'ent_top10_error_share')} | "
              f"{f(r, 'ent_auroc', 3)} | {f(r, 'std_top10_error_rate')} | {f(r, 'std_auroc', 3)} |")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        from incontext.io import atomic_path

        with atomic_path(out) as tmp:
            Path(tmp).write_text(json.dumps({"checkpoint": str(path), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
