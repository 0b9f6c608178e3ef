"""The README table of the diffusion generator: runs the evaluate command for every setting and prints Markdown.

    python benchmarks/diffusion_table.py                         # 500 episodes, seed 0, 3 runs at a time
    python benchmarks/diffusion_table.py --episodes 200 --jobs 2 --out-dir outputs/eval/diffusion
    python benchmarks/diffusion_table.py --table-only            # re-print from the JSONs already written

Each cell is one ``python -m incontext.evaluate benchmark=synthetic method=<m> shots=<k> episodes=<n> seed=<s>
supports=<matched|shuffled> threads=1 progress=false out=<json>`` (the exact commands are printed), so every
number can be reproduced alone. Settings: diffusion with steps 1, 2, 4 and an ensemble of 4 samples x 2 steps;
prototype; painter when ``--painter`` names a checkpoint (or the method's default works).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DIFFUSION = [("steps 1", ["method.steps=1"]), ("steps 2", ["method.steps=2"]), ("steps 4", ["method.steps=4"]),
             ("4 samples x 2 steps", ["method.steps=2", "method.n_samples=4"])]


def runs(args) -> list[tuple[str, str, int, str, list[str], Path]]:
    """(method label, setting label, shots, supports, evaluate arguments, json path) for every cell."""
    out = []
    for shots in args.shots:
        for supports in ("matched", "shuffled"):
            for label, extra in DIFFUSION:
                if args.checkpoint:
                    extra = extra + [f"method.checkpoint={args.checkpoint}"]
                out.append(("diffusion", label, shots, supports, ["method=diffusion", *extra], None))
            out.append(("prototype", "", shots, supports, ["method=prototype"], None))
            if args.painter is not None:
                extra = [f"method.checkpoint={args.painter}"] if args.painter else []
                out.append(("painter", "", shots, supports, ["method=painter", *extra], None))
    cells = []
    for method, label, shots, supports, margs, _ in out:
        tag = label.replace(" ", "") or "default"
        path = args.out_dir / f"{method}-{tag}-{shots}shot-{supports}-seed{args.seed}-{args.episodes}ep.json"
        cells.append((method, label, shots, supports, margs, path))
    return cells


def command(margs: list[str], shots: int, supports: str, args, path: Path) -> list[str]:
    return [sys.executable, "-m", "incontext.evaluate", "benchmark=synthetic", *margs, f"shots={shots}",
            f"episodes={args.episodes}", f"seed={args.seed}", f"supports={supports}", "threads=1",
            "progress=false", f"out={path}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--checkpoint", default=None, help="diffusion checkpoint (default: the shipped one)")
    ap.add_argument("--painter", default=None, nargs="?", const="",
                    help="also evaluate method=painter (optionally with this checkpoint)")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "eval" / "diffusion")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cells = runs(args)

    def go(cell) -> None:
        method, label, shots, supports, margs, path = cell
        if path.is_file():
            return
        cmd = command(margs, shots, supports, args, path)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode}): {r.stderr.strip()[-300:]}"
        print(f"[{time.time() - t0:.0f} s] {' '.join(cmd[2:])} -> {status}", flush=True)

    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(go, cells))

    def res(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    print(f"\n| method | setting | shots | mIoU (matched) | mIoU (shuffled supports) | drop | FB-IoU (matched) "
          f"| s/episode |")
    print("|---|---|---|---|---|---|---|---|")
    seen = set()
    for method, label, shots, supports, margs, path in cells:
        if (method, label, shots) in seen:
            continue
        seen.add((method, label, shots))
        m = res(path)
        s = res(Path(str(path).replace("-matched-", "-shuffled-")))
        if m is None:
            continue
        sh = f"{s['miou']:.1f}" if s else "–"
        drop = f"{m['miou'] - s['miou']:.1f}" if s else "–"
        print(f"| {method} | {label or '–'} | {shots} | {m['miou']:.1f} | {sh} | {drop} | {m['fbiou']:.1f} | "
              f"{m['sec_per_episode']:.3f} |")
    print(f"\nsynthetic test split (240 novel classes), 224 px, {args.episodes} episodes, seed {args.seed}, "
          "CPU, 1 thread; s/episode = median prepare + segment (rendering excluded).")


if __name__ == "__main__":
    main()
