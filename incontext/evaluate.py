"""One evaluation command for every method and benchmark.

    python -m incontext.evaluate benchmark=synthetic method=prototype shots=1 episodes=200 seed=0
    python -m incontext.evaluate benchmark=synthetic method=prototype supports=shuffled      # control
    python -m incontext.evaluate benchmark=synthetic method=generalist supports=none         # retrieval only
    python -m incontext.evaluate benchmark=synthetic method=salient                          # support-free
    python -m incontext.evaluate benchmark=pascal5i benchmark.root=/data/pascal benchmark.fold=0 shots=5
    python -m incontext.evaluate benchmark=folder benchmark.root=my_set/ out=results/mine.json

Protocol: episodes are a seeded, fixed list (``incontext.data.base``); each episode's supports are prepared and
its query segmented by the method (timed together: ``sec_per_episode`` is the median over episodes, the first
one excluded as warm-up); the prediction is scored against the ground truth **at the query's original
resolution** (the label map the loader returns, never a resized copy), per class with the HSNet protocol
(``incontext.metrics.SegmentationMeter``: mIoU = mean over classes of ΣI/ΣU, FB-IoU, boundary IoU), ignoring
label 255. mIoU averages over the classes that received episodes.

Writes ``out`` (JSON; default ``outputs/eval/<benchmark>-<method>-<k>shot-<supports>-seed<s>.json``) and a
Markdown table beside it (same name, ``.md``), and prints a summary. ``peak_rss_mb`` is the process's peak
resident memory (``getrusage``), which includes the Python and torch runtime.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from incontext.errors import InputError


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def build_benchmark(node: DictConfig | dict, *, shots: int, episodes: int | None, seed: int,
                    supports: str) -> Any:
    """Instantiate a benchmark config node (``configs/benchmark/*.yaml``) with the run's episode settings."""
    from hydra.utils import instantiate

    node = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(node), resolve=True))
    node.pop("name", None)
    if "_target_" not in node:
        raise InputError("benchmark: the config has no _target_; point it at an EpisodeBenchmark class")
    return instantiate(node, shots=shots, episodes=episodes, seed=seed, supports=supports)


def evaluate(method: Any, bench: Any, *, progress: bool = True, give_supports: bool = True) -> dict[str, Any]:
    """Run ``method`` on every episode of ``bench``.

    Args:
        method: a ``Segmenter``.
        bench: an ``EpisodeBenchmark``.
        progress: show a progress bar on stderr.
        give_supports: False = pass no supports (``supports=none``): a method with a retriever chooses all its
            supports from its bank.

    Returns:
        the figures (percent): ``miou``, ``fbiou``, ``boundary_iou``, ``mean_episode_iou``, ``per_class`` (by
        class name), timings in seconds and ``episode_iou`` (one per episode and class slot).
    """
    from tqdm import tqdm

    from incontext.metrics import SegmentationMeter

    meter = SegmentationMeter(classes=None, ignore_index=255, boundary=True)
    names: dict[int, str] = {}
    counts: dict[int, int] = {}
    seconds, prep, seg, load = [], [], [], []
    episode_iou: list[float] = []
    bar = tqdm(range(len(bench)), desc=f"{getattr(method, 'name', 'method')}", unit="ep", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for i in bar:
        t0 = time.perf_counter()
        sample = bench[i]
        t1 = time.perf_counter()
        pred = method.segment(sample.episode.query, sample.episode.supports if give_supports else [])
        t2 = time.perf_counter()
        load.append(t1 - t0)
        seconds.append(t2 - t1)
        timings = pred.extras.get("timings", {}) if isinstance(pred.extras, dict) else {}
        if "prepare_s" in timings:
            prep.append(float(timings["prepare_s"]))
        if "segment_s" in timings:
            seg.append(float(timings["segment_s"]))
        if pred.mask.shape != sample.target.shape:
            raise AssertionError(f"episode {i}: prediction {pred.mask.shape} vs target {sample.target.shape}")
        for slot, cid in enumerate(sample.classes):
            label = slot + 1
            gt = (sample.target == label).astype(np.uint8)
            gt[sample.target == 255] = 255
            episode_iou.append(meter.update(pred.mask == label, gt, cid))
            names[cid] = sample.class_names[slot]
            counts[cid] = counts.get(cid, 0) + 1
        if progress and (i % 10 == 0 or i == len(bench) - 1):
            bar.set_postfix(mIoU=f"{meter.summary()['miou']:.1f}")
    bar.close()
    summary = meter.summary()
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return {
        "miou": summary["miou"],
        "fbiou": summary["fbiou"],
        "boundary_iou": summary["boundary_iou"],
        "mean_episode_iou": summary["mean_episode_iou"],
        "episodes": len(seconds),
        "classes_seen": len(names),
        "sec_per_episode": float(np.median(timed)),
        "sec_per_episode_mean": float(np.mean(timed)),
        "sec_first_episode": float(seconds[0]),
        "sec_prepare_median": float(np.median(prep[1:] or prep)) if prep else None,
        "sec_segment_median": float(np.median(seg[1:] or seg)) if seg else None,
        "sec_data_median": float(np.median(load)),
        "per_class": {names[c]: v for c, v in summary["per_class"].items()},
        "per_class_episodes": {names[c]: counts[c] for c in summary["per_class"]},
        "episode_iou": [round(100.0 * x, 3) for x in episode_iou],
    }


def default_out(benchmark: str, method: str, shots: int, supports: str, seed: int) -> Path:
    safe = benchmark.replace("/", "_")
    return Path("outputs") / "eval" / f"{safe}-{method}-{shots}shot-{supports}-seed{seed}.json"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown summary table plus the per-class table."""
    r = result

    def f(x: Any, nd: int = 1) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"

    lines = [
        f"# {r['benchmark']} - {r['method']} ({r['shots']}-shot, supports={r['supports']}, seed={r['seed']})",
        "",
        "| benchmark | method | shots | supports | episodes | mIoU | FB-IoU | boundary IoU | s/episode | "
        "peak RSS (MB) | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['benchmark']} | {r['method']} | {r['shots']} | {r['supports']} | {r['episodes']} | "
        f"{f(r['miou'])} | {f(r['fbiou'])} | {f(r['boundary_iou'])} | {f(r['sec_per_episode'], 3)} | "
        f"{f(r['peak_rss_mb'], 0)} | {r['device']} |",
        "",
        f"Metrics at the query's original resolution; mIoU over {r['classes_seen']} classes (HSNet protocol). "
        "s/episode: median of prepare + segment, first episode excluded.",
        "",
        "| class | episodes | IoU |",
        "|---|---|---|",
    ]
    for name, v in sorted(r["per_class"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {r['per_class_episodes'][name]} | {f(v)} |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as configured (``configs/evaluate.yaml``); writes the JSON and Markdown and returns the result."""
    import incontext
    from incontext.io import atomic_path, write_json
    from incontext.registry import instantiate_method

    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))  # this process only; a shared CPU runs faster with fewer
    bench_name = str(cfg.benchmark.get("name") or cfg.benchmark._target_.rsplit(".", 1)[-1])
    give = str(cfg.supports) != "none"  # none: the episodes of `matched`, but the method gets no supports
    bench = build_benchmark(cfg.benchmark, shots=int(cfg.shots), episodes=cfg.episodes, seed=int(cfg.seed),
                            supports=str(cfg.supports) if give else "matched")
    method = instantiate_method(cfg.method, device=str(cfg.device))
    method_name = str(getattr(method, "name", cfg.method.get("name", "method")))
    out = Path(cfg.out) if cfg.out else default_out(bench_name, method_name, int(cfg.shots), str(cfg.supports),
                                                    int(cfg.seed))
    if out.suffix.lower() != ".json":
        raise InputError(f"out: {str(out)!r} must end in .json (the Markdown table is written beside it)")
    t0 = time.perf_counter()
    figures = evaluate(method, bench, progress=bool(cfg.progress), give_supports=give)
    import torch

    result = {
        "benchmark": bench_name,
        "benchmark_split": getattr(bench, "name", bench_name),
        "method": method_name,
        "shots": int(cfg.shots),
        "seed": int(cfg.seed),
        "supports": str(cfg.supports),
        "device": str(cfg.device),
        **figures,
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.perf_counter() - t0,
        "metric_resolution": "query original size",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "environment": {"incontext": incontext.__version__, "torch": torch.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "machine": platform.machine()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result), encoding="utf-8")
    print(f"{bench_name} | {method_name} | {result['shots']}-shot | supports={result['supports']} | "
          f"{result['episodes']} episodes, {result['classes_seen']} classes | seed {result['seed']}")
    print(f"  mIoU {result['miou']:.2f}  FB-IoU {result['fbiou']:.2f}  boundary IoU "
          f"{result['boundary_iou']:.2f}  (percent, at the query's original resolution)")
    print(f"  {result['sec_per_episode']:.3f} s/episode (median, warm-up excluded), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB, device {result['device']}")
    print(f"  -> {out} and {out.with_suffix('.md')}")
    return result


def _user_error(err: BaseException) -> BaseException | None:
    """The InputError / FileNotFoundError behind ``err`` (Hydra wraps constructor errors), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (InputError, FileNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_cli(cfg: DictConfig) -> int:
    """``run`` with one-line errors (tracebacks with ``debug=true``); returns the exit code (2 = bad input)."""
    try:
        run(cfg)
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for users, traceback on request
        if cfg.get("debug"):
            traceback.print_exc()
        err = _user_error(exc)
        if err is not None:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {exc} (run again with debug=true for the traceback)",
              file=sys.stderr)
        return 1


def main() -> None:
    import hydra

    config_dir = str(Path(__file__).resolve().parent.parent / "configs")

    @hydra.main(config_path=config_dir, config_name="evaluate", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        sys.exit(run_cli(cfg))

    _main()


if __name__ == "__main__":
    main()
