"""Matcher against the fixtures recorded from the released code (``../shared/parity/README.md`` §1, §3, §4).

Every case folder under ``$INCONTEXT_PARITY_DIR/matcher`` (default ``../shared/parity/matcher`` next to the
repository) is run stage by stage: each stage gets the fixture's recorded inputs for that stage and its outputs
are compared with the README's tolerances (integer / boolean arrays exact, DINOv2 tokens and SAM embeddings
1e-4, mask logits 1e-3, scores 1e-5). A decision that flips because of a difference inside those tolerances
(a Hungarian tie, a SAM filter threshold, a mask pixel whose logit is ~0) must be explained by our own numbers
(e.g. the pixel's logit is within 1e-3 of 0) and the test then continues from the fixture's recorded decision.
End to end, the final mask must reach IoU >= 0.999.

Cost: the COCO-config cases decode SAM's 4096-point grid; by default only a few grid batches are decoded and
the end-to-end run is marked ``slow`` for them (``pytest -m slow tests/test_parity_matcher.py``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARITY_ROOT = Path(os.environ.get("INCONTEXT_PARITY_DIR", REPO.parent / "shared" / "parity"))
MATCHER_DIR = PARITY_ROOT / "matcher"
CASES = sorted(d for d in MATCHER_DIR.iterdir() if (d / "case.json").is_file()) if MATCHER_DIR.is_dir() else []
if not CASES:
    pytest.skip(
        f"no Matcher parity cases under {MATCHER_DIR}; set INCONTEXT_PARITY_DIR to the folder holding matcher/",
        allow_module_level=True,
    )

from incontext.match.bidirectional import (  # noqa: E402
    bidirectional_match,
    l2_normalise,
    patch_foreground,
    points_box,
)
from incontext.methods.matcher import resize_image, resize_mask, sam_input  # noqa: E402
from incontext.parity import matcher as pm  # noqa: E402
from incontext.parity.common import decode_rgb, load_case_json, read_case_entry, sha256_array  # noqa: E402
from incontext.refine import instance_scoring as isc  # noqa: E402
from incontext.refine import sam_prompts as sp  # noqa: E402

LOGIT_TOL = 1e-3  # mask logits (README §4)
SCORE_TOL = 1e-5  # predicted IoU, stability, EMD, purity, coverage, scores
TOKEN_TOL = 1e-4  # DINOv2 tokens, SAM embeddings

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The suite runs on 2 shared cores: one intra-op thread avoids OpenMP spinning against other workers
    # (results do not depend on it).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ids = [c.name for c in CASES]
case_param = pytest.mark.parametrize("case_dir", CASES, ids=ids)


def heavy(case_dir: Path) -> bool:
    """COCO/LVIS settings decode SAM's dense grid (4096 single-point prompts): minutes with the tiny SAM."""
    return bool(_meta(case_dir)["hyperparameters"].get("use_dense_mask", 0))


def end_to_end_param():
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if heavy(c) else []) for c in CASES]


@functools.lru_cache(maxsize=None)
def _meta(case_dir: Path) -> dict:
    return load_case_json(case_dir)


@functools.lru_cache(maxsize=None)
def npz(case_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(case_dir / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=2)
def method(case_dir: Path):
    return pm.build_method(pm.load_case(case_dir))


def cand_masks(case_dir: Path) -> np.ndarray:
    s = npz(case_dir, "04_sam")
    return np.unpackbits(s["cand_masks_packed"], axis=-1)[..., : int(s["cand_masks_shape"][-1])].astype(bool)


def fixture_tokens(case_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    f = npz(case_dir, "01_features")
    sup = torch.from_numpy(f["support_prenorm"])
    return l2_normalise(sup.reshape(-1, sup.shape[-1])), l2_normalise(torch.from_numpy(f["query_prenorm"]))


# ----------------------------------------------------------------------------------------------- 00 inputs
@case_param
def test_inputs(case_dir):
    """Decoding (content-sniffed format), augmentation, mask rule, 518 resizes, patch rule, SAM input."""
    meta = _meta(case_dir)
    inp = npz(case_dir, "00_inputs")
    entries = meta["inputs"]["supports"]
    sup_images, sup_masks = [], []
    for i, e in enumerate(entries):
        assert sha256_array(decode_rgb(case_dir / e["image"])) == e["decoded_rgb_sha256"], f"support {i}"
        ci = read_case_entry(case_dir, e)
        aug = e.get("augmentation")
        if aug:
            assert sha256_array(ci.image) == aug["augmented_rgb_sha256"], f"support {i} {aug['name']}"
            if ci.raw_mask.dtype == np.dtype(aug.get("augmented_mask_array_dtype", "uint8")):
                assert sha256_array(ci.raw_mask) == aug["augmented_mask_array_sha256"], f"support {i} mask"
        assert list(ci.image.shape[1::-1]) == e["orig_size_wh"], f"support {i} size"
        sup_images.append(resize_image(ci.image, 518))
        sup_masks.append(resize_mask(ci.mask, 518))
    np.testing.assert_array_equal(np.stack(sup_images), inp["support_images"])
    np.testing.assert_array_equal(np.stack(sup_masks), inp["support_masks"])
    q = read_case_entry(case_dir, meta["inputs"]["query"])
    assert sha256_array(decode_rgb(case_dir / meta["inputs"]["query"]["image"])) == \
        meta["inputs"]["query"]["decoded_rgb_sha256"]
    np.testing.assert_array_equal(resize_image(q.image, 518), inp["query_image"])
    np.testing.assert_array_equal(resize_mask(q.mask, 518), inp["query_mask_gt"])
    pool = patch_foreground(torch.from_numpy(inp["support_masks"]), 14).numpy()
    np.testing.assert_array_equal(pool, inp["support_mask_pool"])
    expected_sam = inp["query_image"] if inp["query_image_sam_equals_query_image"] else inp["query_image_sam"]
    np.testing.assert_array_equal(sam_input(inp["query_image"]), expected_sam)
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(1024).apply_image(expected_sam)
    assert list(resized.shape) == list(npz(case_dir, "04_sam")["sam_input_1024_shape"])
    assert sha256_array(resized) == str(npz(case_dir, "04_sam")["sam_input_1024_sha256"])


# ----------------------------------------------------------------------------------------------- 01 features
@case_param
def test_features(case_dir):
    """DINOv2 pre-norm tokens of the fixture's resized inputs (case weights), and SAM's image embedding."""
    m = method(case_dir)
    inp, f = npz(case_dir, "00_inputs"), npz(case_dir, "01_features")
    with torch.inference_mode():
        enc = m.encode_supports(inp["support_images"], inp["support_masks"])
        q = m.dinov2.patch_tokens(m.dinov2.normalize(inp["query_image"][None]))
    np.testing.assert_allclose(enc["prenorm"].numpy(), f["support_prenorm"], atol=TOKEN_TOL, rtol=0)
    np.testing.assert_allclose(q["prenorm"][0].numpy(), f["query_prenorm"], atol=TOKEN_TOL, rtol=0)
    np.testing.assert_allclose(q["cls"][0].numpy(), f["query_cls_prenorm"], atol=TOKEN_TOL, rtol=0)
    np.testing.assert_array_equal(enc["fg"].numpy(), inp["support_mask_pool"].reshape(-1))
    with torch.inference_mode():
        emb = m.sam_embedding(inp["query_image"])
    np.testing.assert_allclose(emb[0].numpy(), npz(case_dir, "04_sam")["image_embedding"], atol=TOKEN_TOL, rtol=0)


# ----------------------------------------------------------------------------------------------- 02 matching
def _assignment_flip_explained(sim: np.ndarray, rows, ours, theirs) -> bool:
    """Two Hungarian solutions whose objectives agree within float noise are the same decision."""
    return abs(float(sim[rows, ours].astype(np.float64).sum() - sim[rows, theirs].astype(np.float64).sum())) <= 1e-4


@case_param
def test_matching(case_dir):
    """Forward/reverse Hungarian, retention, top-half rule, CPython set order, patch centres."""
    fx = npz(case_dir, "02_matching")
    st, qt = fixture_tokens(case_dir)
    fg = torch.zeros(st.shape[0], dtype=torch.bool)
    fg[torch.from_numpy(fx["fg_support_indices"])] = True
    np.testing.assert_array_equal(
        fg.numpy(), npz(case_dir, "00_inputs")["support_mask_pool"].reshape(-1)
    )
    kw = dict(grid=37, patch_size=14, image_size=(518, 518), use_box=bool(_meta(case_dir)["hyperparameters"]["use_box"]))
    r = bidirectional_match(st, qt, fg, **kw)
    sim_fg = r.similarity[fg].numpy()
    overrides = {}
    if not np.array_equal(r.forward_cols, fx["forward_cols"]) or not np.array_equal(r.forward_rows, fx["forward_rows"]):
        assert _assignment_flip_explained(sim_fg, fx["forward_rows"], r.forward_cols, fx["forward_cols"])
        overrides["forward_override"] = (fx["forward_rows"], fx["forward_cols"])
    if overrides:
        r = bidirectional_match(st, qt, fg, **kw, **overrides)
    if not np.array_equal(r.reverse_cols, fx["reverse_cols"]):
        rev = r.similarity.t()[torch.from_numpy(fx["forward_cols"])].numpy()
        assert _assignment_flip_explained(rev, np.arange(len(rev)), r.reverse_cols, fx["reverse_cols"])
        overrides["reverse_override"] = fx["reverse_cols"]
        r = bidirectional_match(st, qt, fg, **kw, **overrides)
    np.testing.assert_allclose(r.forward_sim, fx["forward_sim"], atol=SCORE_TOL, rtol=0)
    np.testing.assert_allclose(r.kept_sim, fx["kept_sim"], atol=SCORE_TOL, rtol=0)
    if not np.array_equal(r.sort_order, fx["sort_order"]):
        # only reorderings among similarities equal within noise are acceptable
        np.testing.assert_allclose(r.kept_sim[r.sort_order], r.kept_sim[fx["sort_order"]], atol=SCORE_TOL, rtol=0)
        r = bidirectional_match(st, qt, fg, **kw, **overrides, sort_override=fx["sort_order"])
    for key in ("fg_support_indices", "forward_rows", "forward_cols", "forward_support_indices", "reverse_cols",
                "retain", "kept_support_indices", "kept_cols", "sort_order", "top_target_indices_sorted",
                "points_target_indices", "points_xy"):
        np.testing.assert_array_equal(np.asarray(getattr(r, key)), fx[key], err_msg=key)
    assert r.fallback_keep_all == bool(fx["fallback_keep_all"])
    assert r.reduced_points_num == int(fx["reduced_points_num"])


# ----------------------------------------------------------------------------------------------- 03 prompts
@case_param
def test_prompts(case_dir):
    """k-means++ on the torch generator (re-runs, truncation) and the prompt sets, from the fixture points."""
    m = method(case_dir)
    fx, pr = npz(case_dir, "02_matching"), npz(case_dir, "03_prompts")
    seed = int(_meta(case_dir)["episode_seed"])

    class _Match:  # only what Matcher.prompts reads
        points_xy = fx["points_xy"]

    clustering, groups = m.prompts(_Match, seed)
    if "kmeans_runs" in pr:
        assert clustering is not None
        assert clustering.runs == int(pr["kmeans_runs"])
        np.testing.assert_array_equal(clustering.centres_float, pr["kmeans_centers_float"])
        np.testing.assert_array_equal(clustering.assignment, pr["kmeans_assignment"])
        np.testing.assert_array_equal(clustering.centres, pr["centers_xy"])
    else:
        assert clustering is None
    sizes = [g.shape[1] for g in groups]
    np.testing.assert_array_equal(sizes, pr["prompt_sizes"])
    for k, g in zip(sizes, groups):
        np.testing.assert_array_equal(g, pr[f"prompt_sets_k{k}"], err_msg=f"k={k}")
    assert len(pr["sampler_input_points_xy"]) == (len(clustering.centres) if clustering else len(fx["points_xy"]))


# ----------------------------------------------------------------------------------------------- 04 SAM
class SamObserver:
    """Checks every decoded batch against the fixture's per-set records, explaining any flip by our logits."""

    def __init__(self, case_dir: Path, settings: sp.DecodeSettings):
        self.s = npz(case_dir, "04_sam")
        self.settings = settings
        self.cand = {tuple(src): i for i, src in enumerate(self.s["cand_source"].tolist())}
        self.cand_masks = cand_masks(case_dir)
        self.flips = []
        self.checked_candidates = set()

    def _bounds(self, logits: torch.Tensor):
        off = self.settings.stability_offset
        inter = (logits > off).flatten(-2).sum(-1).double()
        uni = (logits > -off).flatten(-2).sum(-1).double()
        a = ((logits - off).abs() <= LOGIT_TOL).flatten(-2).sum(-1).double()
        b = ((logits + off).abs() <= LOGIT_TOL).flatten(-2).sum(-1).double()
        return ((inter - a) / (uni + b)).numpy(), ((inter + a) / (uni - b).clamp_min(1)).numpy()

    def __call__(self, *, branch, group, rows, logits, iou, stability, keep, channel0):
        prefix = "dense" if branch == 0 else f"sel_g{group}"
        rows = np.arange(rows.start, rows.stop)
        f_iou = self.s[f"{prefix}_iou_pred"][rows]
        f_stab = self.s[f"{prefix}_stability"][rows]
        f_pass = self.s[f"{prefix}_pass_filters"][rows]
        iou_np, stab_np, keep_np = iou.numpy(), stability.numpy(), keep.numpy()
        np.testing.assert_allclose(iou_np, f_iou, atol=SCORE_TOL, rtol=0, err_msg=f"{prefix} iou rows {rows[0]}..")
        lo, hi = self._bounds(logits)
        bad = (f_stab < lo - 1e-6) | (f_stab > hi + 1e-6)
        assert not bad.any(), f"{prefix}: stability not explained by logits within {LOGIT_TOL}: rows {rows[bad.any(1)]}"
        if branch == 0:
            t_iou, t_stab = self.settings.pred_iou_thresh, self.settings.stability_score_thresh
        else:
            t_iou, t_stab = self.settings.iou_filter, self.settings.sel_stability_score_thresh
        for r, c in zip(*np.nonzero(keep_np != f_pass)):
            near_iou = t_iou > 0 and abs(float(f_iou[r, c]) - t_iou) <= SCORE_TOL
            near_stab = t_stab > 0 and lo[r, c] - 1e-6 <= t_stab <= hi[r, c] + 1e-6
            assert near_iou or near_stab, f"{prefix} row {rows[r]} ch {c}: filter decision flipped without cause"
            self.flips.append((prefix, int(rows[r]), int(c)))
        for r in range(len(rows)):
            for c in range(keep_np.shape[1]):
                key = (branch, group if branch else -1, int(rows[r]), int(c + channel0))
                if key in self.cand:
                    ours = logits[r, c] > 0
                    theirs = torch.from_numpy(self.cand_masks[self.cand[key]])
                    diff = ours != theirs
                    if diff.any():
                        assert bool((logits[r, c][diff].abs() <= LOGIT_TOL).all()), f"candidate {key}: mask differs"
                    self.checked_candidates.add(key)


def _settings(case_dir: Path) -> sp.DecodeSettings:
    return method(case_dir).decode


def _check_sam(case_dir: Path, full: bool) -> None:
    m = method(case_dir)
    s, pr = npz(case_dir, "04_sam"), npz(case_dir, "03_prompts")
    settings = _settings(case_dir)
    emb = torch.from_numpy(s["image_embedding"])[None]
    groups = [pr[f"prompt_sets_k{k}"] for k in pr["prompt_sizes"]]
    box = None
    if _meta(case_dir)["hyperparameters"]["use_box"]:
        box = points_box(npz(case_dir, "02_matching")["points_xy"], (518, 518))
    obs = SamObserver(case_dir, settings)
    cands = None
    with torch.inference_mode():
        if full or not settings.use_dense:
            cands = sp.generate_candidates(m.sam, emb, (518, 518), groups, box, settings, on_batch=obs)
        else:
            # Default run of a grid config: one grid batch (the first with a mask that passed the filters), the
            # first prompt group and every group that produced a final candidate.
            passing = np.nonzero(s["dense_pass_filters"].any(1))[0] // settings.points_per_batch
            batches = [int(passing[0]) if len(passing) else 0]
            sp.decode_grid(m.sam, emb, (518, 518), settings, sp._Accumulator(), on_batch=obs, batches=batches)
            wanted = {0} | {int(g) for b, g, _, _ in s["cand_source"].tolist() if b == 1}
            subset = [g if i in wanted else g[:0] for i, g in enumerate(groups)]
            sp.decode_prompt_groups(m.sam, emb, (518, 518), subset, box, settings, sp._Accumulator(), on_batch=obs)
    if settings.use_dense:
        np.testing.assert_allclose(
            sp.grid_points(settings.points_per_side, (518, 518)).astype(np.float32), s["dense_points_xy"]
        )
    prompted = [k for k in map(tuple, s["cand_source"].tolist()) if k[0] == 1]
    assert set(prompted) <= obs.checked_candidates
    if full:
        assert {k for k in map(tuple, s["cand_source"].tolist())} <= obs.checked_candidates
    if cands is not None and not obs.flips:
        np.testing.assert_array_equal(cands.pre_nms_source, s["pre_nms_source"])
        np.testing.assert_array_equal(cands.pre_nms_boxes, s["pre_nms_box_xyxy"])
        np.testing.assert_allclose(cands.pre_nms_iou_pred, s["pre_nms_iou_pred"], atol=SCORE_TOL, rtol=0)
        np.testing.assert_array_equal(cands.nms_keep, s["nms_keep"])
        np.testing.assert_array_equal(cands.source, s["cand_source"])
        np.testing.assert_allclose(cands.iou_pred, s["cand_iou_pred"], atol=SCORE_TOL, rtol=0)
        np.testing.assert_array_equal(cands.boxes, s["cand_box_xyxy"])
    # NMS from the recorded pre-NMS boxes and scores (continuing from the fixture's filter decisions)
    keep = sp.box_nms(torch.from_numpy(s["pre_nms_box_xyxy"]), torch.from_numpy(s["pre_nms_iou_pred"]),
                      settings.box_nms_thresh)
    np.testing.assert_array_equal(keep.numpy(), s["nms_keep"])
    np.testing.assert_array_equal(s["pre_nms_source"][keep.numpy()], s["cand_source"])


@case_param
def test_sam_candidates(case_dir):
    """Batched decoding of the recorded prompt sets on the recorded embedding: predicted IoU, stability,
    filters, candidate masks; then NMS on the recorded pre-NMS list. Grid configs: a subset (see
    test_sam_candidates_full)."""
    _check_sam(case_dir, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("case_dir", [c for c in CASES if heavy(c)] or [None], ids=lambda c: getattr(c, "name", "none"))
def test_sam_candidates_full(case_dir):
    """Grid configs: every grid point and prompt set, the pre-NMS list and NMS output exactly."""
    if case_dir is None:
        pytest.skip("no grid-config case")
    _check_sam(case_dir, full=True)


# ----------------------------------------------------------------------------------------------- 05 scores
@case_param
def test_scores_and_selection(case_dir):
    """mask37, EMD, points inside, purity, coverage, score from the recorded candidates; selection and union
    from the recorded metrics (ties broken by torch.topk / torch.sort in candidate order)."""
    m = method(case_dir)
    sc, fx = npz(case_dir, "05_scores"), npz(case_dir, "02_matching")
    masks = torch.from_numpy(cand_masks(case_dir))
    st, qt = fixture_tokens(case_dir)
    cost = ((1 - st @ qt.t()) / 2)[torch.from_numpy(fx["fg_support_indices"])].numpy()
    got = isc.score_candidates(masks, cost, fx["points_xy"], grid=37, alpha=m.alpha, beta=m.beta, exp=m.exp,
                               emd_workers=2)
    for key in ("mask37", "mask37_all_zero_fallback", "mask37_area", "points_inside", "n_points_inside"):
        np.testing.assert_array_equal(getattr(got, key), sc[key], err_msg=key)
    for key in ("emd", "emd_f64", "purity", "coverage", "score"):
        np.testing.assert_allclose(getattr(got, key), sc[key], atol=SCORE_TOL, rtol=0, err_msg=key)

    filters = m.merging_limit(int(_meta(case_dir)["nshot"]))
    sel = isc.select(sc["emd"], sc["purity"], sc["coverage"], sc["score"], filters)
    np.testing.assert_array_equal(sel.after_metric_filters, sc["after_metric_filters"])
    np.testing.assert_array_equal(sel.selected, sc["selected"])
    assert sel.path == _meta(case_dir)["counts"]["selection_path"]
    for key, value in sel.extras.items():
        np.testing.assert_array_equal(value, sc[key], err_msg=key)
    applied = [(a["metric"], a["kept"]) for a in sel.metric_filters]
    assert applied == [(a["metric"], a["kept"]) for a in _meta(case_dir)["counts"]["metric_filters"]]

    # Selection from our own metrics: identical, or a tie broken differently within the score tolerance.
    ours = isc.select(got.emd, got.purity, got.coverage, got.score, filters)
    if not np.array_equal(ours.selected, sel.selected):
        diff = np.setxor1d(ours.selected, sel.selected)
        spread = np.ptp(np.concatenate([got.score[diff], sc["score"][diff]]))
        assert spread <= 2 * SCORE_TOL, "selection differs beyond a float-noise tie"

    final = npz(case_dir, "06_final")
    np.testing.assert_array_equal(isc.union(masks, sel.selected).numpy(), final["final_mask"])
    np.testing.assert_array_equal(final["final_mask"].astype(np.float32), final["final_mask_float"])


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("case_dir", end_to_end_param())
def test_end_to_end(case_dir, tmp_path):
    """The parity runner (``python -m incontext.parity matcher``) from the case folder alone."""
    from PIL import Image

    out = tmp_path / "mask.png"
    mask = pm.run(case_dir, out)
    written = np.asarray(Image.open(out))
    assert written.shape == (518, 518) and set(np.unique(written)) <= {0, 255}
    np.testing.assert_array_equal(written > 0, mask)
    expected = npz(case_dir, "06_final")["final_mask"]
    union = np.logical_or(mask, expected).sum()
    iou = np.logical_and(mask, expected).sum() / union if union else 1.0
    assert iou >= 0.999, f"final mask IoU {iou:.6f}"


def test_cli_reports_bad_case(tmp_path, capsys):
    from incontext.parity.__main__ import get_runner, main

    assert get_runner("matcher") is pm.run
    assert main(["matcher", str(tmp_path), "--out", str(tmp_path / "m.png")]) == 2
    assert "case.json" in capsys.readouterr().err
