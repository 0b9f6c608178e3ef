"""The work behind ``infer.py``: parse the user's inputs, run a method, write outputs atomically.

Kept out of ``infer.py`` so it can be tested and reused without Hydra's process-level entry point.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from incontext.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"


def fail(message: str) -> None:
    """Print one clear error line to stderr."""
    print(f"error: {message}", file=sys.stderr)


def parse_pairs(items: list[str]) -> list[tuple[str, str]]:
    """``["img.jpg:mask.png", ...]`` -> [(image, mask), ...] (split on the last colon)."""
    pairs = []
    for i, item in enumerate(items):
        item = str(item)
        if ":" not in item:
            raise InputError(
                f"supports[{i}]: {item!r} is not image:mask; write supports=[img.jpg:img.png,...] "
                "or use support_dir=<folder>"
            )
        img, mask = item.rsplit(":", 1)
        pairs.append((img, mask))
    return pairs


def list_queries(query: str) -> list[Path]:
    """One image, or the images in a folder (sorted; files that look like masks of an image are skipped)."""
    p = Path(query)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"query: folder {p} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not p.exists():
        raise InputError(f"query: no file or folder at {p}; pass query=<image or folder>")
    return [p]


def gather_supports(cfg: DictConfig) -> list[tuple[Any, Any]]:
    from incontext.io import load_pairs_from_dir

    pairs: list[tuple[Any, Any]] = list(parse_pairs(list(cfg.supports or [])))
    if cfg.support_dir:
        pairs += load_pairs_from_dir(cfg.support_dir)
    return pairs


def build_model(cfg: DictConfig) -> Any:
    from incontext.registry import instantiate_method

    overrides: dict[str, Any] = {"device": cfg.device}
    if cfg.bank:
        from incontext.retrieve import load_retriever

        overrides["retriever"] = load_retriever(cfg.bank, device=cfg.device)
        overrides["shots"] = int(cfg.shots)
    return instantiate_method(cfg.method, **overrides)


def write_outputs(out: Path, stem: str, image: np.ndarray, pred: Any, save_scores: bool) -> dict:
    from incontext.io import write_gray_png, write_json, write_mask_png, write_overlay_png

    write_mask_png(out / f"{stem}_mask.png", pred.mask)
    write_overlay_png(out / f"{stem}_overlay.png", image, pred.mask)
    if save_scores:
        for label, score in pred.scores.items():
            write_gray_png(out / f"{stem}_score_c{label}.png", score)
    if "uncertainty" in pred.extras:
        write_gray_png(out / f"{stem}_uncertainty.png", np.asarray(pred.extras["uncertainty"]))
    h, w = pred.mask.shape
    summary = {
        "query_size_hw": [h, w],
        "labels": [int(c) for c in np.unique(pred.mask) if c],
        "foreground_fraction": float((pred.mask > 0).mean()),
        "instances": [{"label": i.label, "score": float(i.score), "area": int(i.mask.sum())}
                      for i in pred.instances],
        "extras": {k: v for k, v in pred.extras.items() if k != "uncertainty"},
    }
    write_json(out / f"{stem}.json", summary)
    return summary


def run_infer(cfg: DictConfig) -> int:
    """Run ``infer.py``; returns the process exit code."""
    try:
        return _run(cfg)
    except (InputError, FileNotFoundError) as err:
        if cfg.debug:
            traceback.print_exc()
        fail(str(err))
        return 2
    except Exception as err:  # anything else is our bug or the environment's: still one line by default
        if cfg.debug:
            traceback.print_exc()
        fail(f"{type(err).__name__}: {err} (run again with debug=true for the traceback)")
        return 1


def _run(cfg: DictConfig) -> int:
    from tqdm import tqdm

    from incontext.episode import Context
    from incontext.io import read_image

    if cfg.demo:
        OmegaConf.set_struct(cfg, False)
        cfg.query = cfg.query or str(DEMO_DIR / "query.png")
        if not cfg.supports and not cfg.support_dir and not cfg.context:
            cfg.support_dir = str(DEMO_DIR / "supports")
    if not cfg.query:
        raise InputError("query: not given; pass query=<image or folder> (or demo=true)")
    queries = list_queries(cfg.query)
    images = [read_image(q, name=f"query {q}") for q in queries]
    model = build_model(cfg)
    t0 = time.perf_counter()
    if cfg.context:
        context = Context.load(cfg.context, device="cpu")
    else:
        pairs = gather_supports(cfg)
        if not pairs and not cfg.bank:
            raise InputError(
                "supports: none given; pass 'supports=[img.jpg:mask.png]', support_dir=<folder>, "
                "context=<saved.safetensors> or bank=<prompt bank>"
            )
        if pairs:
            context = model.prepare(pairs, resize_masks=bool(cfg.resize_masks))
        else:
            context = None
    prepare_s = time.perf_counter() - t0

    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rows = []
        for qpath, image in tqdm(list(zip(queries, images)), desc="segment", unit="query",
                                 file=sys.stderr, disable=len(queries) < 2):
            t1 = time.perf_counter()
            pred = model.segment(image, context if context is not None else [])
            dt = time.perf_counter() - t1
            summary = write_outputs(staging, qpath.stem, image, pred, bool(cfg.save_scores))
            rows.append({"query": str(qpath), "seconds": dt, **summary})
        from incontext.io import write_json

        write_json(staging / "summary.json", {
            "method": model.name, "device": str(cfg.device), "prepare_s": prepare_s,
            "queries": [{k: r[k] for k in ("query", "seconds", "foreground_fraction", "labels")}
                        for r in rows],
        })
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        if cfg.save_context and context is not None:
            context.save(cfg.save_context)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{model.name}: {len(rows)} quer{'y' if len(rows) == 1 else 'ies'} -> {out}/ "
          f"(prepare {prepare_s:.2f}s)")
    for r in rows:
        print(f"  {Path(r['query']).name}: foreground {100 * r['foreground_fraction']:.1f}% "
              f"labels {r['labels']} in {r['seconds']:.2f}s")
    return 0
