"""The offline defaults of every learned or SAM-based method on the demo episode, as one PNG for the README.

    python benchmarks/offline_demo_figure.py docs/sam_offline_demo.png

Runs ``incontext.build(<method>)`` with no weights configured (so each method uses what ships in ``weights/``:
``sam_tiny_synthetic``, ``patch_encoder_tiny``, ``vrp_tiny``, ``painter_tiny``, ``diffusion_tiny``) on
``examples/demo`` (2 supports, 1 query, the episode ``infer.py demo=true`` segments) and draws: the supports with
their masks | the query with its true mask | one tile per method with its mask and IoU. Two rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from painter_overlays import tile, write_small_png

METHODS = ("prototype", "persam", "persam_f", "matcher_fss", "vrp", "painter", "diffusion")
SIZE = 200
MAGENTA = (255, 0, 220)  # the demo target is green, as the default overlay colour
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"


def main(argv: list[str] | None = None) -> None:
    import incontext
    from incontext.episode import Support
    from incontext.io import overlay, read_image, read_mask

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args(argv)

    supports = [Support.from_arrays(read_image(DEMO / "supports" / f"support_{i}.png"),
                                    (read_mask(DEMO / "supports" / f"support_{i}_mask.png") > 0).astype(np.uint8))
                for i in range(2)]
    query = read_image(DEMO / "query.png")
    gt = read_mask(DEMO / "query_gt.png") > 0
    tiles = [tile(overlay(s.image, s.mask, 0.6, MAGENTA), f"support {i} + mask", SIZE) for i, s in enumerate(supports)]
    tiles.append(tile(overlay(query, gt.astype(np.uint8), 0.6, MAGENTA), "query, true mask", SIZE))
    for name in args.methods:
        m = incontext.build(name).segment(query, supports).mask > 0
        iou = float((m & gt).sum() / max((m | gt).sum(), 1))
        tiles.append(tile(overlay(query, m.astype(np.uint8), 0.6, MAGENTA), f"{name} IoU {100 * iou:.0f}", SIZE))
        print(f"{name}: IoU {100 * iou:.1f}")
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % 5)
    img = np.concatenate([np.concatenate(tiles[i : i + 5], 1) for i in range(0, len(tiles), 5)], 0)
    write_small_png(img, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
