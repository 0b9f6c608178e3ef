"""Matcher speed: seconds per episode split into DINOv2 encode, SAM encode and everything else, with peak memory.

    python benchmarks/matcher_speed.py                                   # FSS + COCO, ViT-L/14 + SAM ViT-H
    python benchmarks/matcher_speed.py --configs fss --sam sam_vit_b --official /tmp/official
    python benchmarks/matcher_speed.py --configs coco --grid 16 --sam-thresholds zero

Models are full-size architectures with random weights (no download): DINOv2 at 518 x 518, SAM at 1024. Each
implementation runs in its own subprocess (so peak RSS is its own), on the same inputs (default: the cat photos
of ../shared/examples/persam, else a synthetic disc) and the same weights.

``--official DIR`` also runs the released code (a checkout of aim-uofa/Matcher with its ``matcher/``,
``dinov2/`` and ``segment_anything/`` folders; never part of this repository) through its ``Matcher`` class with
the same weights, settings and inputs, timed the same way, and checks that both final masks are identical.
The released code needs two adaptations to run here, applied in its worker only: ``np.int`` (removed from numpy)
is aliased to ``int``, and the plotting / sklearn modules its k-means file imports (unused) are stubbed.

"Everything else" = the whole episode minus the DINOv2 forwards (support(s) + query) and the SAM image encoder:
matching, prompt sampling, every SAM decoder call, filters, NMS, scoring and merging. Wall and process-CPU time
are both printed; on a shared machine the CPU time is the fair comparison (each worker's wall time depends on how
much of the cores the other processes leave it), and the last lines give everything else relative to the two
encoder passes. With random SAM weights the
released COCO thresholds reject every mask (the released code then raises); ``--sam-thresholds zero`` sets the
four SAM filters to 0 for both implementations so that the scoring stage runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "examples" / "persam"
SAM_REGISTRY = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h"}
DINO_OFFICIAL = {"dinov2_vits14": "vit_small", "dinov2_vitb14": "vit_base", "dinov2_vitl14": "vit_large",
                 "dinov2_vitg14": "vit_giant2"}
HP_KEYS = ("points_per_side", "pred_iou_thresh", "sel_stability_score_thresh", "stability_score_thresh",
           "iou_filter", "box_nms_thresh", "output_layer", "dense_multimask_output", "use_dense_mask",
           "multimask_output", "num_centers", "use_box", "use_points_or_centers", "sample_range",
           "max_sample_iterations", "alpha", "beta", "exp", "emd_filter", "purity_filter", "coverage_filter",
           "use_score_filter", "deep_score_norm_filter", "deep_score_filter", "topk_scores_threshold",
           "num_merging_mask")


# ------------------------------------------------------------------------------------------------ inputs
def episode_arrays(size: int = 518) -> dict[str, np.ndarray]:
    """Support image/mask and query resized to the working size (the released loaders' resize)."""
    from incontext.methods.matcher import resize_image, resize_mask

    if (EXAMPLES / "cat_00.jpg").is_file():
        from incontext.io import read_image, read_mask

        s_img, s_mask = read_image(EXAMPLES / "cat_00.jpg"), read_mask(EXAMPLES / "cat_00.png") > 0
        q_img = read_image(EXAMPLES / "cat_01.jpg")
        source = "shared/examples/persam cat_00 -> cat_01"
    else:
        yy, xx = np.mgrid[0:400, 0:600]
        rng = np.random.default_rng(0)
        s_mask = (xx - 300) ** 2 + (yy - 200) ** 2 < 90**2
        s_img = rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)
        s_img[s_mask] = (200, 40, 30)
        q_img = np.roll(s_img, 60, axis=1)
        source = "synthetic disc"
    return {
        "support_images": resize_image(s_img, size)[None],
        "support_masks": resize_mask(s_mask, size)[None],
        "query": resize_image(q_img, size),
        "source": np.array(source),
    }


def settings(config: str, args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from incontext.registry import compose_method

    node = OmegaConf.to_container(compose_method(f"matcher_{config}"), resolve=True)
    hp = {k: node[k] for k in HP_KEYS}
    if args.grid is not None:
        hp["points_per_side"] = args.grid
    if args.sam_thresholds == "zero":
        hp.update(pred_iou_thresh=0.0, stability_score_thresh=0.0, iou_filter=0.0, sel_stability_score_thresh=0.0)
    hp["seed"] = 0
    return hp


def save_weights(args: argparse.Namespace, folder: Path) -> tuple[Path, Path]:
    """Random full-size weights in the official key layout, shared by both implementations."""
    import torch
    from safetensors.torch import save_file

    from incontext.backbones.dinov2 import build_dinov2
    from incontext.backbones.sam import build_sam

    dino = build_dinov2(args.dinov2, source="incontext", weights="random", seed=0)
    sam = build_sam(args.sam, weights="random", seed=0)
    dpath, spath = folder / "dinov2.safetensors", folder / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()}, str(dpath))
    save_file({k: v.contiguous() for k, v in sam.model.state_dict().items()}, str(spath))
    del dino, sam
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dpath, spath


# ------------------------------------------------------------------------------------------------ workers
def worker_ours(job: dict) -> dict:
    import torch

    from incontext.backbones.dinov2 import build_dinov2
    from incontext.backbones.sam import build_sam
    from incontext.methods.matcher import Matcher

    ep = dict(np.load(job["inputs"]))
    hp = dict(job["hp"])
    hp["use_dense_mask"], hp["multimask_output"] = bool(hp["use_dense_mask"]), bool(hp["multimask_output"])
    dino = build_dinov2(job["dinov2"], source="incontext", weights=job["dinov2_weights"])
    sam = build_sam(job["sam"], weights=job["sam_weights"])
    m = Matcher(dino, sam, name="matcher_bench", **hp)
    rows = []
    for _ in range(job["episodes"]):
        cpu = CpuClock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            enc = m.encode_supports(ep["support_images"], ep["support_masks"])
            t_sup = time.perf_counter() - t0
            cpu.mark("support")
            q_cache: dict = {}
            m.query_tokens(ep["query"], q_cache)
            cpu.mark("dinov2_query")
            m.sam_embedding(ep["query"], q_cache)
            cpu.mark("sam_encode")
            out = m.run(ep["query"], enc["tokens"], enc["fg"], shots=len(ep["support_images"]), seed=0,
                        cache=q_cache)
            cpu.mark("rest")
            total = time.perf_counter() - t0
        t = out["timings"]
        # the encoders ran before run() (cached): time them from the marks, run() then pays only the rest
        dino_s = t_sup + cpu.wall["dinov2_query"]
        sam_s = cpu.wall["sam_encode"]
        rows.append({"total_s": total, "dinov2_s": dino_s, "sam_encode_s": sam_s,
                     "other_s": total - dino_s - sam_s, "decode_s": t["sam_decode_s"],
                     "scoring_s": t["scoring_s"], "candidates": int(len(out["candidates"].masks)),
                     "selected": int(len(out["selection"].selected)),
                     "cpu_dinov2_s": cpu.cpu["support"] + cpu.cpu["dinov2_query"],
                     "cpu_sam_encode_s": cpu.cpu["sam_encode"], "cpu_other_s": cpu.cpu["rest"]})
    np.save(job["mask_out"], out["final_518"])
    return {"episodes": rows}


class CpuClock:
    """Wall and process-CPU time between marks (CPU time is what the run itself used, robust to a loaded
    machine's scheduling; wall time is what a user waits)."""

    def __init__(self) -> None:
        self.t, self.c = time.perf_counter(), time.process_time()
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def mark(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = t - self.t, c - self.c
        self.t, self.c = t, c


def _stub_modules() -> None:
    """The released k-means file imports matplotlib and sklearn at module level without using them."""
    for name in ("matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.datasets"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                mod = types.ModuleType(name)
                if name == "sklearn.datasets":
                    mod.make_blobs = None
                sys.modules[name] = mod


def worker_official(job: dict) -> dict:
    import random
    from functools import partial

    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    np.int = int  # removed from numpy; the released point-in-mask test uses it
    _stub_modules()
    sys.path.insert(0, job["official"])
    from dinov2.models import vision_transformer as vits  # type: ignore
    from matcher.Matcher import Matcher  # type: ignore
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry  # type: ignore

    ep = dict(np.load(job["inputs"]))
    hp = job["hp"]
    dinov2 = vits.__dict__[DINO_OFFICIAL[job["dinov2"]]](
        img_size=518, patch_size=14, init_values=1e-5, ffn_layer="mlp", block_chunks=0, qkv_bias=True,
        proj_bias=True, ffn_bias=True)
    dinov2.load_state_dict(load_file(job["dinov2_weights"]), strict=True)
    dinov2.eval()
    sam = sam_model_registry[SAM_REGISTRY[job["sam"]]](checkpoint=None)
    sam.load_state_dict(load_file(job["sam_weights"]), strict=True)
    sam.eval()
    gen = SamAutomaticMaskGenerator(
        sam, points_per_side=hp["points_per_side"], points_per_batch=64, pred_iou_thresh=hp["pred_iou_thresh"],
        stability_score_thresh=hp["stability_score_thresh"], stability_score_offset=1.0,
        sel_stability_score_thresh=hp["sel_stability_score_thresh"], sel_pred_iou_thresh=hp["iou_filter"],
        box_nms_thresh=hp["box_nms_thresh"], sel_output_layer=hp["output_layer"],
        output_layer=hp["dense_multimask_output"], dense_pred=hp["use_dense_mask"],
        multimask_output=hp["dense_multimask_output"] > 0, sel_multimask_output=hp["multimask_output"] > 0)
    cfg = {"emd": hp["emd_filter"], "purity": hp["purity_filter"], "coverage": hp["coverage_filter"],
           "score_filter": hp["use_score_filter"], "score": hp["deep_score_filter"],
           "score_norm": hp["deep_score_norm_filter"], "topk_scores_threshold": hp["topk_scores_threshold"]}
    matcher = Matcher(encoder=dinov2, generator=gen, num_centers=hp["num_centers"], use_box=hp["use_box"],
                      use_points_or_centers=hp["use_points_or_centers"], sample_range=tuple(hp["sample_range"]),
                      max_sample_iterations=hp["max_sample_iterations"], alpha=hp["alpha"], beta=hp["beta"],
                      exp=hp["exp"], score_filter_cfg=cfg, num_merging_mask=hp["num_merging_mask"], device="cpu")
    tt = transforms.ToTensor()
    imgs = torch.stack([tt(Image.fromarray(a)) for a in ep["support_images"]])[None]
    masks = torch.from_numpy(ep["support_masks"]).float()[None]
    query = tt(Image.fromarray(ep["query"]))[None]
    rows, final, error = [], None, None
    predictor = gen.predictor
    set_image = predictor.set_image
    for _ in range(job["episodes"]):
        enc = {}

        def timed_set_image(img, *a, **k):
            t, c = time.perf_counter(), time.process_time()
            set_image(img, *a, **k)
            enc["s"], enc["cpu"] = time.perf_counter() - t, time.process_time() - c

        predictor.set_image = timed_set_image
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            matcher.set_reference(imgs, masks)
            matcher.set_target(query)
            t1, c1 = time.perf_counter(), time.process_time()
            ref_feats, tar_feat = matcher.extract_img_feats()
            dino_s, dino_cpu = time.perf_counter() - t1, time.process_time() - c1
            try:
                points, box, _, C, _ = matcher.patch_level_matching(ref_feats=ref_feats, tar_feat=tar_feat)
                pts = matcher.clustering(points) if not matcher.use_points_or_centers else points
                matcher.set_rps()
                out = matcher.mask_generation(matcher.tar_img_np, pts, box, points, matcher.ref_masks_pool, C)
                final = out[0].numpy() > 0
            except Exception as e:  # the released code has no guard for "no SAM mask survived"
                error = f"{type(e).__name__}: {e}"
            total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
            matcher.clear()
        predictor.set_image = set_image
        rows.append({"total_s": total, "dinov2_s": dino_s, "sam_encode_s": enc.get("s", float("nan")),
                     "other_s": total - dino_s - enc.get("s", 0.0), "error": error,
                     "cpu_dinov2_s": dino_cpu, "cpu_sam_encode_s": enc.get("cpu", float("nan")),
                     "cpu_other_s": total_cpu - dino_cpu - enc.get("cpu", 0.0)})
    if final is not None:
        np.save(job["mask_out"], final)
    return {"episodes": rows}


def run_worker(job: dict) -> dict:
    job_path = Path(job["dir"]) / f"{job['impl']}_{job['config']}.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(job_path)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{job['impl']} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(job_path: str) -> None:
    import torch

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    res = (worker_ours if job["impl"] == "ours" else worker_official)(job)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["fss", "coco"], choices=["fss", "coco", "lvis", "part"])
    p.add_argument("--dinov2", default="dinov2_vitl14", choices=sorted(DINO_OFFICIAL))
    p.add_argument("--sam", default="sam_vit_h", choices=sorted(SAM_REGISTRY))
    p.add_argument("--grid", type=int, default=None, help="dense grid side (released: 64)")
    p.add_argument("--sam-thresholds", choices=["scripted", "zero"], default="scripted")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--official", default=None, help="checkout of aim-uofa/Matcher to time the released code")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    sys.path.insert(0, str(REPO))
    import torch

    print(f"# Matcher speed | DINOv2 {args.dinov2} @518, SAM {args.sam} @1024 | random weights | CPU, "
          f"{args.threads} threads (torch {torch.__version__}), machine load {os.getloadavg()[0]:.1f}")
    results = {"args": vars(args), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ep = episode_arrays()
        np.savez(tmp / "inputs.npz", **ep)
        print(f"# inputs: {ep['source']}")
        dpath, spath = save_weights(args, tmp)
        for config in args.configs:
            hp = settings(config, args)
            impls = ["ours"] + (["official"] if args.official else [])
            res = {}
            for impl in impls:
                job = {"impl": impl, "config": config, "dir": str(tmp), "inputs": str(tmp / "inputs.npz"),
                       "hp": hp, "dinov2": args.dinov2, "sam": args.sam, "dinov2_weights": str(dpath),
                       "sam_weights": str(spath), "episodes": args.episodes, "threads": args.threads,
                       "official": args.official, "mask_out": str(tmp / f"{impl}_{config}.npy")}
                res[impl] = run_worker(job)
            same = None
            if args.official:
                a, b = tmp / f"ours_{config}.npy", tmp / f"official_{config}.npy"
                if a.is_file() and b.is_file():
                    same = bool(np.array_equal(np.load(a), np.load(b)))
            results["configs"][config] = {"hp": hp, "results": res, "identical_masks": same}
            report(config, hp, res, same)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def report(config: str, hp: dict, res: dict, same: bool | None) -> None:
    grid = f", grid {hp['points_per_side']}x{hp['points_per_side']}" if hp["use_dense_mask"] else ""
    print(f"\n## {config}{grid} (SAM thresholds iou {hp['iou_filter']}, stability {hp['sel_stability_score_thresh']})")
    print(f"{'impl':<9} {'total s':>8} {'DINOv2 s':>9} {'SAM enc s':>10} {'other s':>8} {'peak MB':>8}  "
          "CPU s (DINOv2 / SAM enc / other); notes")
    for impl, r in res.items():
        for e in r["episodes"]:
            notes = []
            if "candidates" in e:
                notes.append(f"decode {e['decode_s']:.1f} s, scoring {e['scoring_s']:.1f} s, "
                             f"{e['candidates']} candidates, {e['selected']} merged")
            if e.get("error"):
                notes.append(f"raised {e['error'][:60]}")
            cpu = f"{e['cpu_dinov2_s']:.1f} / {e['cpu_sam_encode_s']:.1f} / {e['cpu_other_s']:.1f}"
            print(f"{impl:<9} {e['total_s']:8.1f} {e['dinov2_s']:9.1f} {e['sam_encode_s']:10.1f} {e['other_s']:8.1f} "
                  f"{r['peak_rss_mb']:8.0f}  {cpu}; {'; '.join(notes)}")
    if "official" in res:
        o = np.mean([e["other_s"] for e in res["official"]["episodes"]])
        u = np.mean([e["other_s"] for e in res["ours"]["episodes"]])
        oc = np.mean([e["cpu_other_s"] for e in res["official"]["episodes"]])
        uc = np.mean([e["cpu_other_s"] for e in res["ours"]["episodes"]])
        print(f"everything else: official / ours = {o / u:.1f}x wall, {oc / uc:.1f}x CPU; "
              f"identical final masks: {same}")
    for impl, r in res.items():
        eps = r["episodes"]
        enc = np.mean([e["cpu_dinov2_s"] + e["cpu_sam_encode_s"] for e in eps])
        other = np.mean([e["cpu_other_s"] for e in eps])
        print(f"{impl}: everything else = {other / enc:.2f}x the encoder passes (CPU {other:.1f} s vs {enc:.1f} s)")


if __name__ == "__main__":
    main()
