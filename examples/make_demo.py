"""Regenerate the bundled demo episode (examples/demo/) from the procedural benchmark.

    .venv/bin/python examples/make_demo.py

The demo is episode 1 of the held-out test classes (seed 0, 256 px, 2 shots): two supports with masks and one
query with its ground truth, written as PNG files in the folder layout infer.py reads
(``support_dir``: ``name.png`` + ``name_mask.png``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from incontext.data.synthetic import SyntheticBenchmark
from incontext.io import write_mask_png
from PIL import Image

OUT = Path(__file__).resolve().parent / "demo"
EPISODE, SEED, SIZE, SHOTS = 1, 0, 256, 2


def main() -> None:
    sample = SyntheticBenchmark("test", size=SIZE, shots=SHOTS, episodes=EPISODE + 1, seed=SEED)[EPISODE]
    (OUT / "supports").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sample.episode.supports):
        Image.fromarray(s.image).save(OUT / "supports" / f"support_{i}.png")
        write_mask_png(OUT / "supports" / f"support_{i}_mask.png", s.mask)
    Image.fromarray(sample.episode.query).save(OUT / "query.png")
    write_mask_png(OUT / "query_gt.png", (sample.target == 1).astype(np.uint8))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
