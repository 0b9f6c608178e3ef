"""Does choosing supports from a prompt bank help? mIoU with retrieved vs random supports of the same class.

    python benchmarks/retrieval_vs_random.py                       # prototype, synthetic test, 240 episodes
    python benchmarks/retrieval_vs_random.py --method prototype --shots 1 3 --episodes 240 --per-class 10

Protocol (same method, same episodes, same shot count, same pool; only the choice of supports differs):

* episodes: ``SyntheticBenchmark(split, size)`` episodes 0..N-1 with seed 0 (the evaluate command's list);
  each has one target class (ways = 1) and its query and ground truth are used unchanged;
* pool: a prompt bank of ``--per-class`` images of each class the episodes use, rendered from a bank-only
  random stream (``incontext.retrieve.sources``), so no bank image is an episode query; built once and reused;
* ``--split train`` runs the same comparison on the (class-disjoint) training classes: use it to choose
  retrieval settings, then report the test split;
* ``random``: k entries of the episode's class drawn uniformly from the bank (seeded per episode);
* ``retrieved (w)``: the Retriever's top-k entries of the episode's class for the query, re-rank weight w
  (0 = image-level cosine only, 1 = object-level score only);
* ``benchmark``: the episode's own supports (reference: fresh draws of the class from the episode stream).

Scored with ``incontext.evaluate.evaluate`` (HSNet mIoU over classes at the query's original resolution).
The paired columns compare each condition with ``random`` episode by episode: mean IoU difference with its
standard error and wins/ties/losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from incontext.episode import Episode  # noqa: E402
from incontext.retrieve import PromptBank, Retriever, load_config  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Reselected:
    """A view of a benchmark whose episodes get their supports from ``choose(index, sample) -> [Support]``."""

    def __init__(self, bench, choose, name: str) -> None:
        self.bench, self.choose, self.name = bench, choose, name

    def __len__(self) -> int:
        return len(self.bench)

    def __getitem__(self, i: int):
        sample = self.bench[i]
        sups = self.choose(i, sample)
        return replace(sample, episode=Episode(sample.episode.query, sups))


def get_bank(args: argparse.Namespace) -> PromptBank:
    root = Path(args.bank)
    if (root / "BANK.json").is_file():
        bank = PromptBank.load(root)
        log(f"bank: {root} ({len(bank)} entries, {len(bank.classes)} classes)")
        return bank
    from incontext.retrieve.sources import synthetic_items

    from incontext.data.synthetic import SyntheticBenchmark

    # Only the classes the episodes ask for (all 240 for the test split; a subset of the train split's 960).
    probe = SyntheticBenchmark(args.split, size=args.size, episodes=args.episodes, seed=0)
    classes = sorted({c for i in range(args.episodes) for c in probe.episode_classes(i)})
    items, total = synthetic_items(args.split, per_class=args.per_class, size=args.size, seed=args.bank_seed,
                                   classes=classes)
    bank = PromptBank.create(root, load_config(args.config))
    t0 = time.perf_counter()
    bank.add(items, total=total, cache=False)
    bank.save()
    log(f"bank: built {root} ({len(bank)} entries) in {time.perf_counter() - t0:.0f}s")
    return bank


def paired(a: list[float], b: list[float]) -> dict:
    d = np.asarray(a) - np.asarray(b)
    return {"mean_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "wins": int((d > 1e-9).sum()), "ties": int((np.abs(d) <= 1e-9).sum()), "losses": int((d < -1e-9).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="prototype")
    ap.add_argument("--split", default="test")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--episodes", type=int, default=240)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--bank", default="outputs/banks/synthetic-test-10")
    ap.add_argument("--bank-seed", type=int, default=0)
    ap.add_argument("--config", default="default", help="retrieval config used when the bank is built")
    ap.add_argument("--rerank-weights", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--mmr", type=float, nargs="*", default=[],
                    help="also run retrieval with MMR diversification at these lambdas (re-rank weight 0.5)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="outputs/eval/retrieval_vs_random.json")
    args = ap.parse_args()

    import torch

    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.evaluate import evaluate
    from incontext.registry import build

    torch.set_num_threads(args.threads)
    bank = get_bank(args)
    method = build(args.method)
    results: list[dict] = []
    for k in args.shots:
        bench = SyntheticBenchmark(args.split, size=args.size, shots=k, episodes=args.episodes, seed=0)

        def random_choice(i, sample, k=k):
            ids = bank.class_ids(sample.class_names[0])
            pick = np.random.default_rng([0, 4242, i]).choice(ids, size=min(k, len(ids)), replace=False)
            return [bank.support(int(j)) for j in pick]

        conditions = {"random": random_choice, "benchmark": lambda i, sample: list(sample.episode.supports)}
        for w in args.rerank_weights:
            r = Retriever(bank, rerank_weight=w)

            def retrieved(i, sample, r=r, k=k):
                hits = r.search(sample.episode.query, k, classes=[sample.class_names[0]])
                return [bank.support(h.id) for h in hits]

            conditions[f"retrieved (w={w:g})"] = retrieved
        for lam in args.mmr:
            r = Retriever(bank, rerank_weight=0.5, mmr_lambda=lam)

            def diversified(i, sample, r=r, k=k):
                hits = r.search(sample.episode.query, k, classes=[sample.class_names[0]])
                return [bank.support(h.id) for h in hits]

            conditions[f"retrieved (w=0.5, MMR {lam:g})"] = diversified
        per_ep: dict[str, list[float]] = {}
        for name, choose in conditions.items():
            t0 = time.perf_counter()
            fig = evaluate(method, Reselected(bench, choose, name), progress=True)
            per_ep[name] = fig["episode_iou"]
            row = {"shots": k, "condition": name, "miou": fig["miou"], "fbiou": fig["fbiou"],
                   "mean_episode_iou": fig["mean_episode_iou"], "episodes": fig["episodes"],
                   "classes": fig["classes_seen"], "seconds": time.perf_counter() - t0}
            results.append(row)
            log(f"  {k}-shot {name:<22} mIoU {fig['miou']:6.2f}  FB-IoU {fig['fbiou']:6.2f}  "
                f"({time.perf_counter() - t0:.0f}s)")
        for row in results:
            if row["shots"] == k:
                row["vs_random"] = paired(per_ep[row["condition"]], per_ep["random"])
    lines = [f"Method `{args.method}`, synthetic/{args.split} at {args.size} px, {args.episodes} episodes (seed 0), "
             f"bank of {args.per_class} images per class ({len(bank)} entries, {bank.spec.name}).", "",
             "| shots | supports | mIoU | FB-IoU | mean episode IoU | Δ IoU vs random (paired, ± s.e.) | "
             "wins / ties / losses |", "|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["vs_random"]
        lines.append(f"| {r['shots']} | {r['condition']} | {r['miou']:.2f} | {r['fbiou']:.2f} | "
                     f"{r['mean_episode_iou']:.2f} | {p['mean_diff']:+.2f} ± {p['se']:.2f} | "
                     f"{p['wins']} / {p['ties']} / {p['losses']} |")
    print("\n".join(lines))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
