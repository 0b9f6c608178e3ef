"""Overlays of the painter on held-out test episodes, best and worst, as one small PNG for the README.

    python benchmarks/painter_overlays.py docs/painter_episodes.png --episodes 60 --show 3

Runs ``method=painter`` (the shipped ``weights/painter_tiny`` unless ``--checkpoint``) on the first
``--episodes`` 1-shot episodes of ``benchmark=synthetic`` (test classes, seed 0, 224 px: the evaluate command's
episodes), ranks them by IoU and draws the ``--show`` best and ``--show`` worst, one row each: support with its
mask | query with the true mask | the matching prior the painter reads (grey) | the painted cell | the
prediction (IoU in the label). The PNG is quantised to 128 colours to stay small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

TILE = 112


def tile(rgb: np.ndarray, label: str = "", size: int = TILE) -> np.ndarray:
    """``rgb`` resized to a ``size`` square with ``label`` on a white strip at the top."""
    t = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    if label:
        cv2.rectangle(t, (0, 0), (size - 1, 14), (255, 255, 255), -1)
        cv2.putText(t, label, (3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
    return t


def write_small_png(img: np.ndarray, out: Path) -> None:
    """Write an RGB figure quantised to 128 colours (small enough to commit), atomically."""
    from PIL import Image

    from incontext.io import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(img).quantize(colors=128, dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> None:

    import incontext
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate import canvas
    from incontext.io import overlay

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args(argv)

    method = incontext.build("painter", checkpoint=args.checkpoint)
    stage = method.stages["generate"]
    bench = SyntheticBenchmark(split="test", size=224, shots=1, episodes=args.episodes, seed=0)
    rows = []
    for i in range(len(bench)):
        ep = bench[i].episode
        gt = bench[i].target > 0
        pred = method.segment(ep.query, ep.supports)
        m = pred.mask > 0
        iou = float((m & gt).sum() / max((m | gt).sum(), 1))
        rows.append((iou, i, ep, gt, m, pred))
    rows.sort(key=lambda r: -r[0])
    chosen = rows[: args.show] + rows[-args.show:]
    lines = []
    for iou, i, ep, gt, m, pred in chosen:
        sup = ep.supports[0]
        tiles = [tile(overlay(sup.image, (sup.mask > 0).astype(np.uint8)), f"support (ep {i})"),
                 tile(overlay(ep.query, gt.astype(np.uint8)), "query, true mask")]
        if stage.matcher is not None:
            prior = stage.matcher.similarity(ep.query, stage.matcher.prepare(
                [type(sup).from_arrays(sup.image, (sup.mask > 0).astype(np.uint8))]), {})
            tiles.append(tile(canvas.grey_image(prior), "matching prior"))
        tiles += [tile(pred.extras["painted"], "painted cell"),
                  tile(overlay(ep.query, m.astype(np.uint8)), f"prediction IoU {100 * iou:.0f}")]
        lines.append(np.concatenate(tiles, 1))
    img = np.concatenate(lines, 0)
    write_small_png(img, args.out)
    print(f"wrote {args.out}; mean IoU over {len(rows)} episodes {100 * np.mean([r[0] for r in rows]):.1f}")


if __name__ == "__main__":
    main()
