"""PerSAM / PerSAM-F speed, full-size SAM (random weights) on CPU. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/persam_speed.py [--sam sam_vit_b] [--official-iters 50]
        [--threads N] [--sections personalise,fit,query]

Figures:
1. personalise: ``prepare`` of persam and persam_f (one reference; persam_f includes its 1000-step
   fit);
2. the PerSAM-F fit: cached logits (``incontext.refine.persam_f.fit_mask_weights``) vs the
   official-style loop that runs the frozen decoder (prompt encoder, decoder, post-processing to the
   original size, thresholded masks and numpy copies, as the published ``predictor.predict``) and
   autograd every iteration. The official loop is timed on ``--official-iters`` iterations (its
   per-iteration cost is constant) and both fits are run with that schedule length to check that
   they learn the same weights;
3. per query: one SAM encoder pass alone vs ``segment`` with 1 concept and ``segment_concepts`` with
   5; also the query-side cost beyond the encoder (the same calls with the query's embedding already
   in the cache), which is robust to a busy machine because it is short and repeated.

``--sections`` picks a subset (``personalise,fit,query``); the machine's load average is printed.

Images: ``../shared/examples/persam`` (random weights make the masks meaningless; only time is
measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from incontext.backbones.sam import build_sam  # noqa: E402
from incontext.io import read_image, read_mask  # noqa: E402
from incontext.methods.persam import PerSAM, PerSAMF  # noqa: E402
from incontext.refine.persam_f import fit_mask_weights, fit_mask_weights_reference  # noqa: E402

EXAMPLES = REPO.parent / "shared" / "examples" / "persam"


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sam", default="sam_vit_b", help="sam_vit_b | sam_vit_l | sam_vit_h (random weights)"
    )
    ap.add_argument(
        "--official-iters", type=int, default=50, help="iterations of the official-style loop"
    )
    ap.add_argument(
        "--iterations", type=int, default=1000, help="PerSAM-F fit length (official 1000)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--examples", type=Path, default=EXAMPLES)
    ap.add_argument(
        "--sections", default="personalise,fit,query", help="comma-separated subset to run"
    )
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    ex = args.examples
    ref = (read_image(ex / "cat_00.jpg"), read_mask(ex / "cat_00.png"))
    query = read_image(ex / "cat_01.jpg")
    others = [
        (read_image(ex / f"{n}.jpg"), read_mask(ex / f"{n}.png"))
        for n in ("colorful_sneaker_00", "duck_toy_00", "cat_02", "duck_toy_02")
    ]

    print(
        f"device cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, SAM {args.sam} (random weights)"
    )
    print(
        f"reference {ref[0].shape[1]}x{ref[0].shape[0]}, query {query.shape[1]}x{query.shape[0]}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    pred = build_sam(args.sam, weights="random", seed=0)
    persam = PerSAM(pred)
    persam_f = PerSAMF(pred, iterations=args.iterations)

    with torch.inference_mode():
        t_enc, _ = _timed(lambda: pred.embed(query), repeat=2)
    print(f"\nencoder pass alone (query): {t_enc:.2f} s")

    # 1. personalise
    t_p, ctx = _timed(lambda: persam.prepare([ref]))
    t_pf, ctx_f = _timed(lambda: persam_f.prepare([ref]))
    if "personalise" in sections:
        fit_s = ctx_f.meta["state"]["1"]["fit"]["seconds"]
        print(
            f"\npersonalise (prepare, 1 reference):\n  persam   {t_p:.2f} s\n"
            f"  persam_f {t_pf:.2f} s (of which the {args.iterations}-step fit {fit_s:.2f} s)"
        )

    # 2. fit vs official-style loop
    if "fit" in sections:
        _fit_section(args, pred, persam_f, ctx_f, ref)

    # 3. per query, 1 and 5 concepts
    if "query" in sections:
        concepts = [ctx] + [persam.prepare([o]) for o in others]
        t1, _ = _timed(lambda: persam.segment(query, ctx), repeat=2)
        t5, p5 = _timed(lambda: persam.segment_concepts(query, concepts[:5]), repeat=2)
        with torch.inference_mode():
            t_enc2, emb = _timed(lambda: pred.embed(query), repeat=2)
            states = [persam._state(c, 1) for c in concepts[:5]]
            cache = {"sam_embedding": emb}
            d1, _ = _timed(lambda: persam.segment_binary(query, states[0], cache=cache), repeat=3)
            d5, _ = _timed(
                lambda: [persam.segment_binary(query, s, cache=cache) for s in states], repeat=3
            )
            state_f = persam_f._state(ctx_f, 1)
            d1f, _ = _timed(lambda: persam_f.segment_binary(query, state_f, cache=cache), repeat=3)
        enc = min(t_enc, t_enc2)
        print(
            f"\nper query ({query.shape[1]}x{query.shape[0]}), "
            f"encoder pass alone {enc:.2f} s (best of 4):"
        )
        print(
            f"  persam 1 concept : {t1:.2f} s end to end; beyond the encoder {d1:.2f} s "
            f"-> encoder + {100 * d1 / enc:.0f} %"
        )
        print(
            f"  persam 5 concepts: {t5:.2f} s end to end; beyond the encoder {d5:.2f} s "
            f"-> encoder + {100 * d5 / enc:.0f} % "
            f"(labels {sorted(int(v) for v in np.unique(p5.mask))})"
        )
        print(
            f"  persam_f 1 concept: beyond the encoder {d1f:.2f} s "
            f"-> encoder + {100 * d1f / enc:.0f} %"
        )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def _fit_section(args, pred, persam_f, ctx_f, ref) -> None:
    with torch.inference_mode():
        emb = pred.embed(ref[0])
        state = persam_f._state(ctx_f, 1)
        logits, point = persam_f.training_logits(emb, state["target_sim"])
    target = torch.as_tensor(ref[1] > 0)
    pred.set_embedding(emb)
    coords = torch.as_tensor(pred.to_input_frame(point.astype(np.float64)), dtype=torch.float)[None]
    labels = torch.ones(1, 1, dtype=torch.int)

    def official_logits() -> torch.Tensor:
        # what the published predictor.predict does each iteration: decode, post-process, threshold,
        # copy
        high, iou, low = pred.predict_torch(
            coords, labels, multimask_output=True, return_logits=True
        )
        _ = ((high > pred.model.mask_threshold)[0].numpy(), iou[0].numpy(), low[0].numpy())
        return high[0]

    n = args.official_iters
    t_off, off = _timed(lambda: fit_mask_weights_reference(official_logits, target, iterations=n))
    t_fast_n, fast_n = _timed(lambda: fit_mask_weights(logits, target, iterations=n))
    t_fast, _ = _timed(lambda: fit_mask_weights(logits, target, iterations=args.iterations))
    t_once, _ = _timed(lambda: persam_f.training_logits(emb, state["target_sim"]))
    diff = float((off.weights - fast_n.weights).abs().max())
    per_off, per_fast = t_off / n, t_fast / args.iterations
    print(f"\nPerSAM-F fit ({ref[0].shape[1]}x{ref[0].shape[0]} logits):")
    print(
        f"  official-style loop: {per_off * 1000:.1f} ms/iteration ({n} iterations timed) -> "
        f"{per_off * args.iterations:.1f} s for {args.iterations}"
    )
    print(
        f"  cached logits:       {per_fast * 1000:.1f} ms/iteration -> "
        f"{t_fast:.2f} s for {args.iterations} "
        f"(+ {t_once:.2f} s for the one decoder call)"
    )
    print(
        f"  ratio (official / cached, whole fit incl. the decoder call): "
        f"{per_off * args.iterations / (t_fast + t_once):.1f}x"
    )
    print(
        f"  same weights after {n} iterations: max |diff| = {diff:.2e} "
        f"(official {off.weights.numpy().round(6).tolist()}, "
        f"cached {fast_n.weights.numpy().round(6).tolist()})"
    )


if __name__ == "__main__":
    main()
