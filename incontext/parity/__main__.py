"""``python -m incontext.parity <method> <case_dir> --out <mask.png>``: run one parity case end to end.

Methods: ``matcher`` (Matcher fixtures), ``persam`` and ``persam_f`` (PerSAM fixtures). Each runner reads only
the case folder (inputs, weights, settings) and writes the final mask as a 0/255 PNG; runners are imported
lazily so one method's dependencies never slow another's start.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np

from incontext.errors import InputError

RUNNERS = {
    "matcher": "incontext.parity.matcher:run",
    "persam": "incontext.parity.persam:run_persam",
    "persam_f": "incontext.parity.persam:run_persam_f",
}


def get_runner(method: str):
    """The ``run(case_dir, out)`` function of ``method``."""
    if method not in RUNNERS:
        raise InputError(f"method: {method!r} is not known; use one of {', '.join(RUNNERS)}")
    module, func = RUNNERS[method].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m incontext.parity", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(RUNNERS), help="which published method the case is for")
    parser.add_argument("case_dir", help="a parity case folder (with case.json or meta.json)")
    parser.add_argument("--out", required=True, help="where to write the final mask (0/255 PNG)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        mask = get_runner(args.method)(args.case_dir, args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mask = np.asarray(mask, dtype=bool)
    print(
        f"{args.method}: wrote {args.out} ({mask.shape[1]}x{mask.shape[0]}, foreground {mask.mean():.4f}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
