"""Speed and memory of the procedural benchmark's generator and of methods on fixed episodes (prints only).

    python benchmarks/eval_speed.py                       # generator + every offline-buildable method
    python benchmarks/eval_speed.py --methods prototype salient --episodes 20 --size 224 --threads 1

Generator: milliseconds per image (wall and CPU) at 128, 224 and 512 px, one process, one thread.
Methods: each runs in its own subprocess on the same episodes (synthetic test split, seed 0) and reports
episodes/s, median s/episode (prepare + segment, first episode excluded), the median of prepare and segment
separately, and the subprocess's peak RSS. A method whose weights are missing is listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def generator_speed(n: int = 100) -> None:
    from incontext.data.synthetic import SceneRenderer

    print("procedural benchmark, one image (1 target class, distractors, clutter), median over images:")
    for size in (128, 224, 512):
        r = SceneRenderer("test", size)
        k = n if size < 500 else max(10, n // 5)
        wall, cpu = [], []
        for i in range(k):
            t0, c0 = time.perf_counter(), time.process_time()
            r.scene(np.random.default_rng([0, i]), [r.pools.ids[i % len(r.pools.ids)]])
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(f"  {size:4d} px: {1000 * np.median(wall):6.2f} ms wall, {1000 * np.median(cpu):6.2f} ms CPU "
              f"({1 / np.median(wall):.0f} images/s)")


def one_method(name: str, episodes: int, size: int, shots: int, threads: int) -> dict:
    import torch

    import incontext
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.evaluate import evaluate, peak_rss_mb

    torch.set_num_threads(threads)
    try:
        method = incontext.build(name)
    except (FileNotFoundError, ValueError, ImportError) as err:
        return {"method": name, "skipped": str(err).splitlines()[0]}
    bench = SyntheticBenchmark(size=size, shots=shots, episodes=episodes, seed=0)
    t0 = time.perf_counter()
    r = evaluate(method, bench, progress=False)
    wall = time.perf_counter() - t0
    return {"method": name, "episodes": episodes, "episodes_per_s": episodes / wall,
            "sec_per_episode": r["sec_per_episode"], "sec_prepare": r["sec_prepare_median"],
            "sec_segment": r["sec_segment_median"], "sec_data": r["sec_data_median"],
            "miou": r["miou"], "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=None, help="default: incontext.available()")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-generator", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_method(a.one, a.episodes, a.size, a.shots, a.threads)))
        return
    if not a.no_generator:
        generator_speed()
    import incontext

    methods = a.methods or incontext.available()
    print(f"\nmethods on {a.episodes} synthetic test episodes, {a.size} px, {a.shots}-shot, device cpu, "
          f"{a.threads} thread(s), each in its own process:")
    print(f"  {'method':18s} {'ep/s':>6s} {'s/ep':>7s} {'prepare':>8s} {'segment':>8s} {'RSS MB':>7s} {'mIoU':>6s}")
    for m in methods:
        cmd = [sys.executable, __file__, "--one", m, "--episodes", str(a.episodes), "--size", str(a.size),
               "--shots", str(a.shots), "--threads", str(a.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            err = (p.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"  {m:18s} failed: {err[:100]}")
            continue
        if "skipped" in r:
            print(f"  {m:18s} skipped: {r['skipped'][:100]}")
            continue

        def f(x, nd=3):
            return f"{x:.{nd}f}" if x is not None else "n/a"

        print(f"  {m:18s} {r['episodes_per_s']:6.2f} {f(r['sec_per_episode']):>7s} {f(r['sec_prepare']):>8s} "
              f"{f(r['sec_segment']):>8s} {r['peak_rss_mb']:7.0f} {r['miou']:6.1f}")


if __name__ == "__main__":
    main()
