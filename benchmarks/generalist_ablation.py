"""The generalist's ablation table: every stage alone, each stage removed, retrieval vs given supports.

    python benchmarks/generalist_ablation.py --bench synthetic --shots 1            # 500 episodes, seed 0
    python benchmarks/generalist_ablation.py --bench folder --shots 1 5             # outputs/folder_alt (400 images)
    python benchmarks/generalist_ablation.py --bench synthetic --split train --episodes 100   # tuning (train classes)
    python benchmarks/generalist_ablation.py --table-only --bench synthetic folder --shots 1 5

Every cell is one ``python -m incontext.evaluate benchmark=<b> method=<m> <overrides> shots=<k> episodes=<n>
seed=<s> threads=1 progress=false out=<json>`` run (the commands are printed, so each number can be reproduced
alone), one at a time under ``nice``. Every row gets the same episodes and the same number of supports per
episode (``shots``); the retrieval rows change only where the supports come from:

* ``given``: the benchmark's ``shots`` supports (all other rows);
* ``retrieved only``: no support given (``supports=none``); the retriever picks ``shots`` from a bank;
* ``1 given + k-1 retrieved`` (k >= 2): the benchmark's first support only (``shots=1``), the rest from the bank.

Banks (``--bank-synthetic``, ``--bank-folder``): built with ``python -m incontext.bank build`` from images that are
never an episode's query (the synthetic bank is rendered from a bank-only stream; the folder bank holds the set's
own images, and a bank never returns an image equal to the query or a given support).

Weights: the shipped ones by default; ``--diffusion``, ``--diffusion-nomatch``, ``--sam``, ``--painter`` point at
training folders instead (``runs/<name>/checkpoints/last``) before the weights are shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rows(a: argparse.Namespace, shots: int) -> list[tuple[str, str, list[str]]]:
    """(key, label, evaluate arguments) of every row for ``shots``."""
    diff = [f"method.checkpoint={a.diffusion}"] if a.diffusion else []
    paint = [f"method.checkpoint={a.painter}"] if a.painter else []
    g = ["method=generalist"]
    if a.diffusion:
        g.append(f"method.generate.generators.diffusion.checkpoint={a.diffusion}")
    if a.sam:
        g.append(f"method.refine.sam.weights={a.sam}")
    if a.painter_member:
        p = {"_target_": "incontext.generate.painter.PainterStage", "checkpoint": a.painter}
        g.append("+method.generate.generators.painter={" + ",".join(f"{k}:{v}" for k, v in p.items() if v) + "}")
    if a.weights:
        g.append(f"method.generate.weights={{{a.weights}}}")
    out = [
        ("generalist", "**generalist**", g),
        ("diffusion", "diffusion (its prototype prior + generator)", ["method=diffusion", *diff]),
        ("prototype", "prototype (match alone)", ["method=prototype"]),
    ]
    if a.painter is not None:
        out.append(("painter", "painter (generator alone)", ["method=painter", *paint]))
    if a.persam:
        out.append(("persam", "PerSAM (SAM alone: location prior + guided decoder)", ["method=persam"]))
    out += [
        ("no_refine", "generalist − refine", [*g, "method.refine=null"]),
        ("proto_sam", "generalist − generate (prototype prior → SAM)",
         [*g, "method.generate.weights={diffusion:0.0,match:1.0}"]),
        ("no_hflip", "generalist − mirror averaging", [*g, "method.generate.hflip=false"]),
    ]
    if a.diffusion_nomatch:
        nm = [x for x in g if "generators.diffusion.checkpoint" not in x]
        out.append(("no_match", "generalist − match (generator trained without the prior)",
                    [*nm, "method.match=null", f"method.generate.generators.diffusion.checkpoint={a.diffusion_nomatch}"]))
    if a.painter_member:
        out.append(("no_painter", "generalist − painter", [x for x in g if "generators.painter" not in x]))
        out.append(("no_diffusion", "generalist − diffusion",
                    [*g, "method.generate.weights={diffusion:0.0}"]))
    return out


def retrieval_rows(a: argparse.Namespace, bench: str, shots: int, base: list[str]) -> list[tuple[str, str, list[str]]]:
    bank = a.bank_synthetic if bench == "synthetic" else a.bank_folder
    if not bank:
        return []
    b = [*base, f"method.retriever.bank={bank}", f"method.shots={shots}"]
    out = [("retrieved", f"generalist, {shots} retrieved (none given)", [*b, "supports=none"])]
    if shots >= 2:
        out.append(("given1_retrieved", f"generalist, 1 given + {shots - 1} retrieved", [*b, "@shots=1"]))
    return out


def command(a: argparse.Namespace, bench: str, shots: int, margs: list[str], path: Path) -> list[str]:
    bargs = ["benchmark=synthetic", f"benchmark.split={a.split}"] if bench == "synthetic" else \
        ["benchmark=folder", f"benchmark.root={a.folder_root}"]
    episodes = f"episodes={a.episodes}" if bench == "synthetic" else \
        f"episodes={a.folder_episodes}" if a.folder_episodes else "episodes=null"
    shot_arg = f"shots={shots}"
    rest = []
    for m in margs:
        if m.startswith("@shots="):
            shot_arg = "shots=" + m.split("=", 1)[1]  # the benchmark's shots (given supports) differ from the row's
        else:
            rest.append(m)
    return [sys.executable, "-m", "incontext.evaluate", *bargs, *rest, shot_arg, episodes, f"seed={a.seed}",
            "threads=1", "progress=false", f"out={path}"]


def shared_pass(a: argparse.Namespace, bench_name: str, shots: int, cells: list, every: int = 25) -> None:
    """Run every row of one (benchmark, shots) in ONE process over the same episodes (each episode rendered once,
    every method's ``segment`` called on it in turn). Each row is composed from exactly the evaluate command's
    arguments (``configs/evaluate.yaml`` + overrides) and scored like ``incontext.evaluate.evaluate``; its JSON is
    rewritten every ``every`` episodes, so a cut-short run still leaves figures (with their episode count)."""
    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from incontext.evaluate import build_benchmark
    from incontext.io import write_json
    from incontext.metrics import SegmentationMeter
    from incontext.registry import instantiate_method

    torch.set_num_threads(1)
    todo = []
    for _, _, key, label, margs, path in cells:
        if path.is_file() and json.loads(path.read_text()).get("complete"):
            continue
        cmd = command(a, bench_name, shots, margs, path)
        overrides = [x for x in cmd[3:] if not x.startswith(("threads=", "progress=", "out="))]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=overrides)
        give = str(cfg.supports) != "none"
        method = instantiate_method(cfg.method, device="cpu")
        todo.append(dict(key=key, label=label, path=path, cfg=cfg, give=give, method=method,
                         given=int(cfg.shots), cmd=" ".join(["python", *cmd[1:]]),
                         meter=SegmentationMeter(classes=None, ignore_index=255, boundary=True),
                         seconds=[], ious=[], names={}))
        print(f"row {key}: {' '.join(cmd[2:])}", flush=True)
    if not todo:
        return
    cfg0 = todo[0]["cfg"]
    benches = {}
    for t in todo:  # rows whose benchmark gives fewer supports (1 given + k-1 retrieved) get their own episodes
        benches.setdefault(t["given"], build_benchmark(t["cfg"].benchmark, shots=t["given"], episodes=cfg0.episodes,
                                                       seed=int(cfg0.seed), supports="matched"))
    n = len(next(iter(benches.values())))

    def dump(t: dict, done: int) -> None:
        summ = t["meter"].summary()
        timed = t["seconds"][1:] or t["seconds"]
        write_json(t["path"], {
            "benchmark": bench_name, "method": t["key"], "label": t["label"], "shots": shots, "seed": a.seed,
            "supports": str(t["cfg"].supports), "given_supports": t["given"] if t["give"] else 0,
            "episodes": done, "episodes_planned": n, "complete": done == n,
            "miou": summ["miou"], "fbiou": summ["fbiou"], "boundary_iou": summ["boundary_iou"],
            "mean_episode_iou": summ["mean_episode_iou"], "classes_seen": len(t["names"]),
            "sec_per_episode": float(np.median(timed)), "sec_per_episode_mean": float(np.mean(timed)),
            "episode_iou": [round(100.0 * x, 3) for x in t["ious"]], "command": t["cmd"],
            "runner": "benchmarks/generalist_ablation.py --shared (one process, rows interleaved per episode)",
            "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        })

    t_start = time.time()
    for i in range(n):
        samples = {k: b[i] for k, b in benches.items()}
        for t in todo:
            sample = samples[t["given"]]
            t1 = time.perf_counter()
            pred = t["method"].segment(sample.episode.query, sample.episode.supports if t["give"] else [])
            t["seconds"].append(time.perf_counter() - t1)
            for slot, cid in enumerate(sample.classes):
                gt = (sample.target == slot + 1).astype(np.uint8)
                gt[sample.target == 255] = 255
                t["ious"].append(t["meter"].update(pred.mask == slot + 1, gt, cid))
                t["names"][cid] = sample.class_names[slot]
        if (i + 1) % every == 0 or i + 1 == n:
            for t in todo:
                dump(t, i + 1)
            print(f"[{time.time() - t_start:.0f} s] {bench_name} {shots}-shot: {i + 1}/{n} episodes: " +
                  ", ".join(f"{t['key']} {t['meter'].summary()['miou']:.1f}" for t in todo), flush=True)


def analyse(bench: str, shots_list: list[int], cells: list, res) -> None:
    """Per-episode view of the rows (same episodes in every row): paired differences against the generalist,
    failures (episode IoU < 10 %: the wrong object or nothing, which no boundary refinement can fix), and the
    oracle that picks the better of two rows per episode (the most any per-query choice between them could give).
    Uses mean episode IoU (classes have one episode each in the first 240 synthetic episodes)."""
    import numpy as np

    for shots in shots_list:
        rows = {c[2]: res(c[5]) for c in cells if c[0] == bench and c[1] == shots and res(c[5])}
        if "generalist" not in rows:
            continue
        n = min(len(r["episode_iou"]) for r in rows.values())
        e = {k: np.asarray(r["episode_iou"][:n]) for k, r in rows.items()}
        g = e["generalist"]
        print(f"\n{bench} {shots}-shot, first {n} episodes: per-episode IoU (%)\n")
        print("| row | mean | IoU < 10 % | generalist − row (mean ± s.e.) | generalist wins / losses (±1) "
              "| oracle max(generalist, row) |")
        print("|---|---|---|---|---|---|")
        for k, x in e.items():
            d = g - x
            se = d.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
            print(f"| {k} | {x.mean():.1f} | {100 * (x < 10).mean():.0f} % | {d.mean():+.1f} ± {se:.1f} | "
                  f"{int((d > 1).sum())} / {int((d < -1).sum())} | {np.maximum(g, x).mean():.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", default=["synthetic"], choices=["synthetic", "folder"])
    ap.add_argument("--shots", type=int, nargs="+", default=[1])
    ap.add_argument("--episodes", type=int, default=500, help="synthetic episodes")
    ap.add_argument("--folder-episodes", type=int, default=None, help="folder episodes (default: every image once)")
    ap.add_argument("--split", default="test", help="synthetic split (train for tuning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folder-root", default="outputs/folder_alt")
    ap.add_argument("--diffusion", default=None, help="diffusion checkpoint folder (default: shipped)")
    ap.add_argument("--diffusion-nomatch", default=None, help="diffusion model trained without the match prior")
    ap.add_argument("--sam", default=None, help="SAM folder for refine (default: shipped sam_tiny_synthetic)")
    ap.add_argument("--painter", default=None, nargs="?", const="", help="also the painter rows (checkpoint)")
    ap.add_argument("--painter-member", action="store_true", help="fuse the painter into the generalist")
    ap.add_argument("--persam", action="store_true", help="also the PerSAM row (the shipped SAM offline)")
    ap.add_argument("--weights", default=None, help="fusion weights, e.g. 'diffusion:0.6,painter:0.4'")
    ap.add_argument("--bank-synthetic", default=None, help="bank for the synthetic retrieval rows")
    ap.add_argument("--bank-folder", default=None, help="bank for the folder-set retrieval rows")
    ap.add_argument("--only", nargs="*", default=None, help="row keys to run (default: all)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "outputs" / "eval" / "generalist")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--analyse", action="store_true", help="also print the per-episode analysis")
    ap.add_argument("--shared", action="store_true",
                    help="all rows of a (benchmark, shots) in one process, episodes rendered once (see shared_pass)")
    a = ap.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    cells = []
    for bench in a.bench:
        for shots in a.shots:
            rs = rows(a, shots)
            g = next(r[2] for r in rs if r[0] == "generalist")
            for key, label, margs in rs + retrieval_rows(a, bench, shots, g):
                if a.only and key not in a.only:
                    continue
                split = f"-{a.split}" if bench == "synthetic" and a.split != "test" else ""
                path = a.out_dir / f"{bench}{split}-{key}-{shots}shot-seed{a.seed}.json"
                cells.append((bench, shots, key, label, margs, path))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if a.shared and not a.table_only:
        os.nice(15)
        for bench in a.bench:
            for shots in a.shots:
                shared_pass(a, bench, shots, [c for c in cells if c[0] == bench and c[1] == shots])
    elif not a.table_only:
        for bench, shots, key, label, margs, path in cells:
            if path.is_file():
                continue
            cmd = command(a, bench, shots, margs, path)
            t0 = time.time()
            r = subprocess.run(["nice", "-n", "15", *cmd], cwd=REPO, capture_output=True, text=True, env=env)
            status = "ok" if r.returncode == 0 else f"FAILED ({r.returncode}): {r.stderr.strip()[-400:]}"
            print(f"[{time.time() - t0:.0f} s] {' '.join(cmd[2:])} -> {status}", flush=True)

    def res(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    for bench in a.bench:
        print(f"\n### {bench}" + (f" ({a.split} split)" if bench == "synthetic" else f" ({a.folder_root})"))
        shots_list = a.shots
        print("\n| row | " + " | ".join(f"{k}-shot mIoU | FB-IoU | s/ep" for k in shots_list) + " |")
        print("|---|" + "---|---|---|" * len(shots_list))
        labels: dict[str, str] = {}
        for b, shots, key, label, margs, path in cells:
            if b == bench:
                labels.setdefault(key, label.replace(f"{shots} retrieved", "k retrieved")
                                  .replace(f"{shots - 1} retrieved", "k−1 retrieved"))
        for key, label in labels.items():
            cols = []
            for shots in shots_list:
                path = next((c[5] for c in cells if c[0] == bench and c[1] == shots and c[2] == key), None)
                r = res(path) if path else None
                part = "" if not r or r.get("complete", True) else f" ({r['episodes']} ep)"
                cols.append(f"{r['miou']:.1f}{part} | {r['fbiou']:.1f} | {r['sec_per_episode']:.3f}" if r
                            else "– | – | –")
            print(f"| {label} | " + " | ".join(cols) + " |")
        if a.analyse:
            analyse(bench, a.shots, cells, res)
        eps = {res(c[5])["episodes"] for c in cells if c[0] == bench and res(c[5])}
        print(f"\nepisodes per cell: {sorted(eps)}, seed {a.seed}, CPU, 1 thread, nice 15 on a shared machine "
              "(s/ep = median seconds per episode, prepare + segment).")


if __name__ == "__main__":
    main()
