"""Painter speed on this machine: training episodes/s and inference s/episode for the tiny config of
``experiment=painter_tiny``, and one forward of the full SegGPT ViT-L config (random weights).

    .venv/bin/python benchmarks/painter_speed.py                 # all three
    .venv/bin/python benchmarks/painter_speed.py --skip-large    # tiny only (seconds)
    .venv/bin/python benchmarks/painter_speed.py --threads 1 --steps 20

Prints one line per figure plus the load average before/after, so numbers from a shared machine can be
judged (a 2-core box with load 8 gives a process roughly a quarter of a core's worth per thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def tiny_model_config() -> dict:
    cfg = OmegaConf.load(REPO / "configs" / "experiment" / "painter_tiny.yaml")
    return OmegaConf.to_container(cfg.task.model, resolve=True)


def bench_training(model_cfg: dict, batch: int, steps: int, size: int) -> dict:
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate.painter_task import PainterTask
    from incontext.train.data import EpisodeSource, stack
    from incontext.train.optim import build_adamw

    task = PainterTask(model=model_cfg, p_lower_half=0.5)
    torch.manual_seed(0)
    model = task.build_model()
    opt = build_adamw(model, 1e-4, 0.05)
    src = EpisodeSource(SyntheticBenchmark(split="train", size=size, episodes=1))
    data_s, step_s = [], []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        b = stack([task.make_sample(src[s * batch + i], np.random.default_rng(s * batch + i))
                   for i in range(batch)])
        t1 = time.perf_counter()
        loss, _ = task.loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if s:  # first step is warm-up
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
    d, c = statistics.median(data_s), statistics.median(step_s)
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "data_s_per_batch": d,
            "compute_s_per_step": c, "episodes_per_s": batch / (d + c),
            "episodes_per_s_compute_only": batch / c}


def bench_inference(model_cfg: dict, shots: int, episodes: int, size: int) -> float:
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate.painter import PainterMethod

    torch.manual_seed(0)
    seg = PainterMethod(model_config=model_cfg)
    bench = SyntheticBenchmark(split="test", size=size, shots=shots, episodes=episodes + 1)
    times = []
    for i in range(len(bench)):
        s = bench[i]
        t0 = time.perf_counter()
        seg.segment(s.episode.query, s.episode.supports)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_large() -> dict:
    from transformers import SegGptConfig, SegGptForImageSegmentation

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = SegGptForImageSegmentation(SegGptConfig()).eval()
    t1 = time.perf_counter()
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        model(pixel_values=x, prompt_pixel_values=x, prompt_masks=x)
    t2 = time.perf_counter()
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "build_s": t1 - t0,
            "forward_1shot_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: painter_tiny's)")
    ap.add_argument("--episodes", type=int, default=10, help="timed inference episodes per shot count")
    ap.add_argument("--size", type=int, default=None, help="benchmark image side (default: painter_tiny's)")
    ap.add_argument("--skip-large", action="store_true", help="skip the ViT-L forward (~1 min on 2 cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = OmegaConf.load(REPO / "configs" / "experiment" / "painter_tiny.yaml")
    batch = args.batch or int(exp.train.batch_size)
    size = args.size or int(exp.data.train.size)
    model_cfg = tiny_model_config()
    print(f"device=cpu threads={torch.get_num_threads()} cores={os.cpu_count()} "
          f"load_avg_before={os.getloadavg()[0]:.2f} torch={torch.__version__}")
    tr = bench_training(model_cfg, batch, args.steps, size)
    print(f"tiny painter ({tr['params_M']:.2f} M params, canvas {model_cfg['image_size']}, patch "
          f"{model_cfg['patch_size']}): training {tr['episodes_per_s']:.2f} episodes/s at batch {batch} "
          f"(data {tr['data_s_per_batch']:.3f} s + compute {tr['compute_s_per_step']:.3f} s per step; "
          f"compute only {tr['episodes_per_s_compute_only']:.2f} episodes/s)")
    for shots in (1, 5):
        s = bench_inference(model_cfg, shots, args.episodes, size)
        print(f"tiny painter inference: {s:.4f} s/episode {shots}-shot (feature ensemble, {size}px episodes, "
              f"prepare + segment)")
    if not args.skip_large:
        lg = bench_large()
        print(f"SegGPT ViT-L config, random weights ({lg['params_M']:.1f} M params): build {lg['build_s']:.1f} s, "
              f"one 1-shot forward (896x448 canvas) {lg['forward_1shot_s']:.1f} s")
    print(f"load_avg_after={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
