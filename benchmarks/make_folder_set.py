"""Write the alternative-generator few-shot set (incontext/data/alt_set.py) as a folder set.

    python benchmarks/make_folder_set.py                       # outputs/folder_alt, 40 classes x 10 images, seed 0
    python -m incontext.evaluate benchmark=folder benchmark.root=outputs/folder_alt method=prototype shots=1
"""

from __future__ import annotations

import argparse
import time

from incontext.data.alt_set import write_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="outputs/folder_alt", help="output folder (git-ignored by default)")
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--images", type=int, default=10, help="images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-side", type=int, default=160)
    ap.add_argument("--max-side", type=int, default=224)
    a = ap.parse_args()
    t0 = time.perf_counter()
    root = write_set(a.root, a.classes, a.images, a.seed, (a.min_side, a.max_side))
    print(f"wrote {a.classes} classes x {a.images} images to {root} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
