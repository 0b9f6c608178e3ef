"""Where does the shipped painter read its prompt: the prompt pairs, the matching prior's hint, or both?

    python benchmarks/painter_prompt_ablation.py --episodes 200

On the first ``--episodes`` 1-shot test episodes (``benchmark=synthetic``, seed 0, 224 px), every row paints the
same query; only what the model is shown changes:

* matched: prompt pair and prior from the episode's own support (what ``method=painter`` does);
* prior shuffled: prompt pair from the support, prior computed from another class's support (the benchmark's
  ``supports=shuffled`` support for that episode);
* pair shuffled: prompt pair from the other class's support, prior from the episode's own support;
* both shuffled: ``supports=shuffled`` as the evaluate command runs it;
* black hint: prompt pair from the support, the prior replaced by an all-black hint (no prior).

Printed: mean per-episode foreground IoU x 100 (not the class-averaged mIoU of ``incontext.evaluate``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    import incontext
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.generate import canvas

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args(argv)

    stage = incontext.build("painter", checkpoint=args.checkpoint).stages["generate"]
    if stage.matcher is None:
        raise SystemExit("this checkpoint reads no matching prior; nothing to ablate")
    matched = SyntheticBenchmark(split="test", size=224, shots=1, episodes=args.episodes, seed=0)
    shuffled = SyntheticBenchmark(split="test", size=224, shots=1, episodes=args.episodes, seed=0,
                                  supports="shuffled")
    palette = canvas.binary_palette()
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("matched", "prior shuffled", "pair shuffled", "both shuffled", "black hint")}
    with torch.no_grad():
        for i in range(len(matched)):
            sm, ss = matched[i], shuffled[i]
            q, gt = sm.episode.query, sm.target == 1
            st_m, st_s = stage.prepare(sm.episode.supports), stage.prepare(ss.episode.supports)
            hint_m = canvas.grey_image(stage.matcher.similarity(q, st_m["match"], {}))
            hint_s = canvas.grey_image(stage.matcher.similarity(q, st_s["match"], {}))
            cases = {"matched": (st_m, hint_m), "prior shuffled": (st_m, hint_s), "pair shuffled": (st_s, hint_m),
                     "both shuffled": (st_s, hint_s), "black hint": (st_m, np.zeros_like(hint_m))}
            for name, (st, hint) in cases.items():
                rgb = stage._paint_cell(q, st["images"], st["masks"], palette, 1, {}, hint)
                pred = canvas.binary_score(rgb, palette[0], palette[1], q.shape[:2]).numpy() > 0.5
                rows[name].append(float((pred & gt).sum() / max((pred | gt).sum(), 1)))
    for name, v in rows.items():
        print(f"{name:15s} {100 * np.mean(v):5.1f}")


if __name__ == "__main__":
    main()
