"""Prompted mIoU of a SAM on objects of the procedural benchmark's held-out (test-split) classes.

    python benchmarks/sam_eval.py                                   # the shipped weights/sam_tiny_synthetic
    python benchmarks/sam_eval.py --sam runs/sam_tiny_synthetic/checkpoints/best --scenes 200 --split train

Protocol (``incontext.train.sam_task.prompt_ious``): every object of a target or distractor class (all of them
test-split classes; unlabelled clutter excluded) covering >= 0.2 % of a 224 x 224 scene is prompted with
1 centre click (the highest predicted-IoU of SAM's 3 masks; "oracle" = the best of the 3), 3 clicks (each later
click at the centre of the larger error region, previous low-res logits as mask prompt) and its tight box; IoU at
the scene's resolution, averaged over objects. Scenes are seeded (scene i = f(seed, i)). Prints the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    from incontext.backbones.sam_shipped import build_shipped_sam, load_sam_folder
    from incontext.train.sam_task import PromptEvalSet, evaluate_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sam", default=None, help="SAM folder (config.json + model.safetensors); default: shipped")
    ap.add_argument("--split", default="test", choices=("test", "train"), help="classes of the objects")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pred = load_sam_folder(args.sam) if args.sam else build_shipped_sam()
    data = PromptEvalSet(split=args.split, size=args.size, scenes=args.scenes, seed=args.seed)
    t0 = time.perf_counter()
    out = evaluate_prompts(pred, data, clicks=args.clicks)
    secs = time.perf_counter() - t0
    out.update({"sam": pred.name, "split": args.split, "scenes": args.scenes, "size": args.size,
                "seed": args.seed, "seconds": secs, "threads": torch.get_num_threads()})
    print(f"{pred.name} on {int(out['objects'])} objects of {args.split}-split classes "
          f"({args.scenes} scenes, {args.size} px, seed {args.seed}):")
    print(f"  1 click   mIoU {out['miou_1pt']:.1f}   (oracle of 3 masks {out['miou_1pt_oracle']:.1f})")
    print(f"  {args.clicks} clicks  mIoU {out[f'miou_{args.clicks}pt']:.1f}")
    print(f"  box       mIoU {out['miou_box']:.1f}")
    print(f"  {secs:.1f} s ({secs / max(1, args.scenes):.3f} s per scene incl. encoder, "
          f"{out['threads']} threads)")
    if args.json:
        from incontext.io import write_json

        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
