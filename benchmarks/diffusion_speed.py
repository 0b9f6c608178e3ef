"""Speed of the diffusion mask generator: inference ms per episode (and per DDIM step) and training steps/s.

    python benchmarks/diffusion_speed.py                                   # shipped checkpoint, 1 thread
    python benchmarks/diffusion_speed.py --checkpoint runs/diffusion_tiny/checkpoints/best --episodes 20
    python benchmarks/diffusion_speed.py --random                          # architecture of the experiment

Inference: on procedural test episodes at 224 px, ``prepare`` (support encoding, once per context) and
``segment`` (query encoding + sampling) are timed separately with ``Segmenter.prepare`` / ``segment``; medians
over episodes after one warm-up. "ms/step" = segment time / (steps x n_samples), the cost of one denoiser call
at batch 1 including the per-query overhead shared out. Training: ``DiffusionTask.loss`` + backward + AdamW on
batches of the experiment's shape (steps/s), and the data cost (render + resample) per sample. Both wall and
CPU (process) time are printed: on a shared machine wall time is inflated by other jobs, CPU time is not.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _experiment() -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "experiment" / "diffusion_tiny.yaml")
    return OmegaConf.to_container(cfg, resolve=True)


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def inference(model, episodes: int, shots_list: list[int], settings: list[tuple[int, int]]) -> None:
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate.diffusion import DiffusionMethod

    print("\n## Inference (synthetic test episodes, 224 px; medians, warm-up excluded)\n")
    print("| shots | steps | n_samples | prepare ms (wall / CPU) | segment ms (wall / CPU) | "
          "ms per denoiser call (CPU) |")
    print("|---|---|---|---|---|---|")
    for shots in shots_list:
        bench = SyntheticBenchmark(split="test", size=224, shots=shots, episodes=episodes + 1, seed=0)
        eps = [bench[i].episode for i in range(episodes + 1)]
        for steps, n in settings:
            method = DiffusionMethod(model=model, steps=steps, n_samples=n,
                                     uncertainty="std" if n > 1 else "entropy")
            prep, seg = [], []
            for i, ep in enumerate(eps):
                pw, pc, ctx = _timed(lambda: method.prepare(ep.supports))
                sw, sc, _ = _timed(lambda: method.segment(ep.query, ctx))
                if i:
                    prep.append((pw, pc))
                    seg.append((sw, sc))
            p = np.median(np.array(prep), 0) * 1000
            s = np.median(np.array(seg), 0) * 1000
            print(f"| {shots} | {steps} | {n} | {p[0]:.1f} / {p[1]:.1f} | {s[0]:.1f} / {s[1]:.1f} | "
                  f"{s[1] / (steps * n):.1f} |")


def training(exp: dict, steps: int, batch_size: int | None) -> None:
    from hydra.utils import instantiate

    from incontext.train.data import as_train_item, stack

    task = instantiate(exp["task"], _convert_="all")
    data = instantiate(exp["data"]["train"], _convert_="all")
    bs = int(batch_size or exp["train"]["batch_size"])
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    dw, dc, samples = _timed(lambda: [task.make_sample(as_train_item(data.episode(i)),
                                                       np.random.default_rng(i)) for i in range(bs)])
    batch = stack(samples)
    times = []
    for i in range(steps + 1):
        def step():
            torch.manual_seed(i)
            loss, _ = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        w, c, _ = _timed(step)
        if i:
            times.append((w, c))
    t = np.median(np.array(times), 0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n## Training (experiment=diffusion_tiny: batch {bs}, frame {task.size} px, "
          f"max {task.max_shots} shots, {n_params / 1e6:.2f} M parameters)\n")
    print("| | wall | CPU |")
    print("|---|---|---|")
    print(f"| optimiser step (s) | {t[0]:.3f} | {t[1]:.3f} |")
    print(f"| steps/s | {1 / t[0]:.2f} | {1 / t[1]:.2f} |")
    print(f"| data per sample (ms, render + resample) | {1000 * dw / bs:.1f} | {1000 * dc / bs:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model folder (default: the shipped one)")
    ap.add_argument("--random", action="store_true", help="random model with the experiment's architecture")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from incontext.generate.diffusion import DEFAULT_CHECKPOINT, load_diffusion
    from incontext.generate.diffusion_net import DiffusionSegModel

    exp = _experiment()
    if args.random:
        torch.manual_seed(0)
        model, source = DiffusionSegModel(exp["task"]["model"]).eval(), "random init (timing only)"
    else:
        path = args.checkpoint or DEFAULT_CHECKPOINT
        model, source = load_diffusion(path), str(path)
    print(f"# diffusion speed — model: {source}; torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    inference(model, args.episodes, args.shots, [(1, 1), (2, 1), (4, 1), (2, 4)])
    if not args.skip_train:
        training(exp, args.train_steps, args.batch_size)


if __name__ == "__main__":
    main()
