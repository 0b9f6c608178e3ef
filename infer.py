"""Few-shot inference on your own files.

    python infer.py query=q.jpg 'supports=[s1.jpg:s1.png,s2.jpg:s2.png]' output_dir=out/
    python infer.py query=queries/ support_dir=examples/ method=prototype device=cpu
    python infer.py demo=true output_dir=out/demo

Writes, per query, ``<name>_mask.png`` (palette PNG at the query's size), ``<name>_overlay.png`` and
``<name>.json``, plus ``summary.json``. Everything is written to a temporary folder first and moved into
``output_dir`` only when every query succeeded, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from incontext.cli import run_infer


@hydra.main(config_path="configs", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run_infer(cfg))


if __name__ == "__main__":
    main()
