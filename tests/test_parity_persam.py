"""Stage-by-stage parity of PerSAM / PerSAM-F with fixtures recorded from the published code.

Every case folder under ``$INCONTEXT_PARITY_DIR/persam`` (default ``../shared/parity/persam`` next
to the repo) is checked; the module is skipped when there is none. Format and tolerances:
``shared/parity/README.md`` (sections 2-4). Each stage gets the fixture's own inputs for that stage
(features, prompts, mask inputs, boxes), so one stage's float noise cannot cascade. Decisions
(points, chosen mask, boxes) must agree exactly unless the fixture's choice is a near tie (within
the score tolerance) — then the fixture's decision is used and the test continues. Masks may differ
only on pixels whose logit is within 1e-4 of the threshold.

The full PerSAM-F fit (up to 1000 iterations on megapixel images) and the end-to-end runs of every
case are ``slow``; the default run checks the first iterations of every fit trajectory and one
end-to-end case.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from incontext.backbones.sam import SamEmbedding
from incontext.match.location_prior import (
    attention_bias,
    foreground_features,
    location_map,
    official_mask_grid,
    select_points,
    target_embedding,
    upsample_to_original,
)
from incontext.parity.persam import _predictor, load_case, run_persam, run_persam_f
from incontext.refine.persam_decoder import box_from_mask, decode
from incontext.refine.persam_f import fit_mask_weights, mix_logits
from tests.conftest import REPO

PARITY = Path(os.environ.get("INCONTEXT_PARITY_DIR", REPO.parent / "shared" / "parity")) / "persam"
CASES = (
    sorted(p.name for p in PARITY.iterdir() if (p / "meta.json").is_file())
    if PARITY.is_dir()
    else []
)

EMB_ATOL = 1e-4  # embeddings, decoder tokens
LOGIT_ATOL = 1e-3  # mask logits
SCORE_ATOL = 1e-5  # predicted IoU, similarity maps, learned weights, losses
BOUNDARY = 1e-4  # |logit| below which a mask pixel may flip
DEFAULT_FIT_STEPS = 40  # iterations of each fit trajectory checked in the default run

if not CASES:
    pytest.skip(
        f"no PerSAM parity fixtures under {PARITY} (set INCONTEXT_PARITY_DIR)",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def _case(name: str):
    d = PARITY / name
    return {
        "dir": d,
        "case": load_case(d),
        "inputs": dict(np.load(d / "inputs.npz")),
        "persam": dict(np.load(d / "persam.npz")),
        "persam_f": dict(np.load(d / "persam_f.npz")),
    }


@lru_cache(maxsize=None)
def _pred(name: str):
    return _predictor(_case(name)["case"])


def _set(pred, inputs, which: str):
    pred.set_embedding(
        SamEmbedding(
            torch.from_numpy(inputs[f"{which}_features"]),
            tuple(int(v) for v in inputs[f"{which}_original_size"]),
            tuple(int(v) for v in inputs[f"{which}_input_size"]),
        )
    )


def _close(got, want, atol, what):
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(
        got.astype(np.float64), np.asarray(want, np.float64), atol=atol, rtol=0, err_msg=what
    )


def _masks_match(logits: torch.Tensor, expected: np.ndarray, what: str) -> None:
    lg = logits.detach().cpu().numpy()
    diff = (lg > 0) != expected
    assert diff.shape == expected.shape, what
    assert (np.abs(lg[diff]) < BOUNDARY).all(), (
        f"{what}: {int(diff.sum())} pixels differ, largest |logit| {np.abs(lg[diff]).max():.3g}"
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _point(full: torch.Tensor, expected_xy: np.ndarray, largest: bool, what: str) -> np.ndarray:
    """Our argmax/argmin point; if it differs from the fixture's, theirs must be a near tie."""
    pos, neg = select_points(full)
    ours = pos if largest else neg
    if not np.array_equal(ours, expected_xy):
        x, y = expected_xy[0]
        best = float(full.max() if largest else full.min())
        assert abs(float(full[y, x]) - best) <= SCORE_ATOL, (
            f"{what}: {ours} vs fixture {expected_xy}"
        )
    return expected_xy


def _best(iou: torch.Tensor, expected: int, what: str) -> int:
    ours = int(np.argmax(iou.numpy()))
    if ours != expected:
        assert float(iou[ours] - iou[expected]) <= SCORE_ATOL, (
            f"{what}: chose {ours}, fixture {expected}"
        )
    return expected


class _Recorder:
    """Captures the two-way transformer's input tokens and outputs during one decoder call."""

    def __init__(self, decoder):
        self.t = decoder.transformer
        self.seen = {}

    def __enter__(self):
        def pre(_m, args, kwargs):
            self.seen["tokens_in"] = (
                kwargs.get("point_embedding", args[2] if len(args) > 2 else None)
            ).clone()

        def post(_m, _args, _kwargs, out):
            self.seen["hs"], keys = out[0].clone(), out[1]
            self.seen["keys_stats"] = np.array(
                [float(keys.double().sum()), float(keys.double().abs().sum())]
            )

        self.h = [
            self.t.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
            self.t.register_forward_hook(post, with_kwargs=True),
        ]
        return self.seen

    def __exit__(self, *exc):
        for h in self.h:
            h.remove()


def _check_pass(pred, fx: dict, k: int, out, seen, *, points, labels, box, what: str) -> None:
    p = f"pass{k}_"
    _close(
        pred.to_input_frame(points.astype(np.float64)).astype(np.float32),
        fx[p + "point_coords_1024"],
        EMB_ATOL,
        what + " coords",
    )
    np.testing.assert_array_equal(points, fx[p + "point_coords"], err_msg=what)
    np.testing.assert_array_equal(labels, fx[p + "point_labels"], err_msg=what)
    if p + "box" in fx:
        np.testing.assert_array_equal(
            np.asarray(box).reshape(1, 4), fx[p + "box"], err_msg=what + " box"
        )
    _close(seen["tokens_in"], fx[p + "decoder_tokens_in"], EMB_ATOL, what + " tokens in")
    _close(seen["hs"], fx[p + "decoder_hs"], EMB_ATOL, what + " decoder hs")
    np.testing.assert_allclose(
        seen["keys_stats"], fx[p + "decoder_keys_stats"], rtol=1e-5, err_msg=what
    )
    _close(out.iou, fx[p + "iou_pred"], SCORE_ATOL, what + " iou")
    if p + "low_res_logits" in fx:
        _close(out.low_res, fx[p + "low_res_logits"], LOGIT_ATOL, what + " low-res logits")
    full = out.high_res()
    for i in range(full.shape[0]):
        _masks_match(full[i], fx[p + "masks"][i], f"{what} mask {i}")
        st = fx[p + "high_res_logits_stats"][i]
        _close(
            [float(full[i].min()), float(full[i].max()), float(full[i].double().mean())],
            st[:3],
            LOGIT_ATOL,
            what + " logit stats",
        )


def _decode_recorded(pred, fx, k, **kw):
    with _Recorder(pred.model.mask_decoder) as seen:
        out = decode(pred, **kw)
    sparse, _ = pred.prompt_embeddings(*_prompt_tensors(pred, kw))
    _close(sparse, fx[f"pass{k}_sparse_embeddings"], EMB_ATOL, f"pass{k} sparse")
    return out, seen


def _prompt_tensors(pred, kw):
    emb = pred.current_embedding()
    coords = torch.as_tensor(
        pred.to_input_frame(np.asarray(kw["points_xy"], np.float64)), dtype=torch.float
    )
    labels = torch.as_tensor(kw["point_labels"], dtype=torch.int)[None]
    box = kw.get("box_xyxy")
    boxes = (
        None
        if box is None
        else torch.as_tensor(
            pred.transform.apply_boxes(np.asarray(box).reshape(1, 4), emb.original_size),
            dtype=torch.float,
        )
    )
    return coords[None], labels, boxes, None


# ------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("name", CASES)
def test_inputs_and_reference_mask_grid(name):
    c = _case(name)
    case, inputs = c["case"], c["inputs"]
    images = c["case"].meta.get("inputs", {})
    for key, arr in (("ref_image", case.ref_image), ("test_image", case.query_image)):
        want = images.get(key, {}).get("decoded_rgb_sha256")
        if want:
            assert hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() == want, key
    np.testing.assert_array_equal(case.ref_red > 0, inputs["ref_mask_binary"])
    img_size = _pred(name).model.image_encoder.img_size
    from segment_anything.utils.transforms import ResizeLongestSide

    rgb = np.zeros(case.ref_red.shape + (3,), np.uint8)
    rgb[..., 0] = case.ref_red
    np.testing.assert_array_equal(
        ResizeLongestSide(img_size).apply_image(rgb)[..., 0], inputs["ref_mask_resized"][..., 0]
    )
    model = _pred(name).model
    grid = official_mask_grid(
        case.ref_red,
        tuple(inputs["ref_features"].shape[-2:]),
        img_size=img_size,
        pixel_mean_r=float(model.pixel_mean.flatten()[0]),
        pixel_std_r=float(model.pixel_std.flatten()[0]),
    )
    for method in ("persam", "persam_f"):
        _close(grid.values, c[method]["ref_mask_grid_values"], SCORE_ATOL, f"{method} grid values")
        np.testing.assert_array_equal(grid.cells.numpy(), c[method]["ref_mask_grid"])


# ------------------------------------------------------------------------------------------ PerSAM
def _map_checks(loc, fx, prefix: str, what: str) -> None:
    _close(loc.grid, fx[prefix + "sim_feat"], SCORE_ATOL, what + " sim grid")
    _close(loc.lowres, fx[prefix + "sim_lowres"], SCORE_ATOL, what + " sim low-res")
    s = int(fx[prefix + "sim_img_stride"])
    assert tuple(loc.full.shape) == tuple(fx[prefix + "sim_img_shape"])
    _close(loc.full[::s, ::s], fx[prefix + "sim_img_sub"], SCORE_ATOL, what + " sim full")
    full = loc.full.double()
    _close(
        [float(full.mean()), float(full.std()), float(full.min()), float(full.max())],
        fx[prefix + "sim_img_stats_f64"],
        SCORE_ATOL,
        what + " sim stats",
    )


@pytest.mark.parametrize("name", CASES)
def test_persam_stages(name):
    c = _case(name)
    fx, inputs, pred = c["persam"], c["inputs"], _pred(name)
    with torch.inference_mode():
        local = foreground_features(
            torch.from_numpy(inputs["ref_features"][0]), torch.from_numpy(fx["ref_mask_grid"])
        )
        t = target_embedding(local)
        _close(t.raw, fx["target_embedding"].reshape(-1), EMB_ATOL, "target embedding")
        _close(t.sim, fx["target_feat"].reshape(-1), SCORE_ATOL, "target feat")
        _set(pred, inputs, "test")
        loc = location_map(
            torch.from_numpy(fx["target_feat"][0]),
            torch.from_numpy(inputs["test_features"][0]),
            img_size=pred.model.image_encoder.img_size,
            input_size=tuple(inputs["test_input_size"]),
            original_size=tuple(inputs["test_original_size"]),
        )
        _map_checks(loc, fx, "", "persam")
        pos = _point(loc.full, fx["positive_point_xy"], True, "positive point")
        neg = _point(loc.full, fx["negative_point_xy"], False, "negative point")
        bias = attention_bias(loc.full, tuple(inputs["test_features"].shape[-2:]))
        _close(bias, fx["attn_sim"], SCORE_ATOL, "attention bias")

        points, labels = np.concatenate([pos, neg]), np.array([1, 0])
        temb = torch.from_numpy(fx["decoder_target_embedding"])
        np.testing.assert_array_equal(fx["decoder_target_embedding"], fx["target_embedding"])
        # pass 1: both hooks, single output (fixture bias and semantic prompt as inputs)
        kw = dict(
            points_xy=points,
            point_labels=labels,
            multimask=False,
            attn_sim=torch.from_numpy(fx["attn_sim"]),
            target_embedding=temb,
        )
        out1, seen = _decode_recorded(pred, fx, 1, **kw)
        _check_pass(
            pred, fx, 1, out1, seen, points=points, labels=labels, box=None, what="persam pass 1"
        )
        # pass 2: mask input = fixture pass-1 logits, multimask, no hooks
        kw = dict(
            points_xy=points,
            point_labels=labels,
            multimask=True,
            mask_input=torch.from_numpy(fx["pass1_low_res_logits"][0:1]),
        )
        out2, seen = _decode_recorded(pred, fx, 2, **kw)
        _check_pass(
            pred, fx, 2, out2, seen, points=points, labels=labels, box=None, what="persam pass 2"
        )
        b2 = _best(out2.iou, int(fx["pass2_best_idx"]), "pass 2 choice")
        _close(
            out2.low_res[b2 : b2 + 1],
            fx["pass2_low_res_logits_best"],
            LOGIT_ATOL,
            "pass 2 best logits",
        )
        box = box_from_mask(fx["pass2_masks"][b2])
        ours_box = box_from_mask(out2.high_res(b2) > 0)
        np.testing.assert_array_equal(ours_box, box, err_msg="pass 3 box from our pass-2 mask")
        # pass 3: box of the fixture's pass-2 mask + its logits
        kw = dict(
            points_xy=points,
            point_labels=labels,
            multimask=True,
            box_xyxy=box,
            mask_input=torch.from_numpy(fx["pass2_low_res_logits_best"][0]),
        )
        out3, seen = _decode_recorded(pred, fx, 3, **kw)
        _check_pass(
            pred, fx, 3, out3, seen, points=points, labels=labels, box=box, what="persam pass 3"
        )
        b3 = _best(out3.iou, int(fx["pass3_best_idx"]), "pass 3 choice")
        assert b3 == int(fx["final_best_idx"])
        _close(
            out3.low_res[b3 : b3 + 1],
            fx["pass3_low_res_logits_best"],
            LOGIT_ATOL,
            "pass 3 best logits",
        )
        final = (out3.high_res(b3) > 0).numpy()
    assert _iou(final, fx["final_mask"]) >= 0.999


# ------------------------------------------------------------------------------------------
# PerSAM-F
def _train_logits(name: str) -> torch.Tensor:
    c = _case(name)
    inputs, fx = c["inputs"], c["persam_f"]
    low = torch.from_numpy(fx["train_low_res_logits"])[None]
    return upsample_to_original(
        low,
        img_size=_pred(name).model.image_encoder.img_size,
        input_size=tuple(inputs["ref_input_size"]),
        original_size=tuple(inputs["ref_original_size"]),
    )[0]


def _check_fit(name: str, steps: int | None) -> None:
    fx = _case(name)["persam_f"]
    T = int(fx["train_num_iters"])
    fit = fit_mask_weights(
        _train_logits(name),
        torch.from_numpy(fx["gt_mask"]),
        iterations=T,
        lr=_case(name)["case"].lr,
        record=True,
        stop_after=steps,
    )
    n = len(fit.history["loss"])
    assert n == (T if steps is None else min(steps, T))
    h = fit.history
    _close(h["w_used"], fx["train_w_used"][:n], SCORE_ATOL, "weights per iteration")
    _close(h["lr"], fx["train_lr"][:n], 1e-12, "learning rate per iteration")
    for key, ref in (
        ("loss", "train_loss"),
        ("dice", "train_dice_loss"),
        ("focal", "train_focal_loss"),
    ):
        np.testing.assert_allclose(h[key], fx[ref][:n], atol=SCORE_ATOL, rtol=1e-5, err_msg=key)
    if n == T:
        _close(fit.weights, fx["mask_weights"], SCORE_ATOL, "learned mask weights")
        _close(fit.w, fx["train_w_final"], SCORE_ATOL, "learned w")


@pytest.mark.parametrize("name", CASES)
def test_persam_f_reference_side(name):
    c = _case(name)
    fx, inputs, pred = c["persam_f"], c["inputs"], _pred(name)
    np.testing.assert_array_equal(c["case"].ref_red > 0, fx["gt_mask"])
    with torch.inference_mode():
        local = foreground_features(
            torch.from_numpy(inputs["ref_features"][0]), torch.from_numpy(fx["ref_mask_grid"])
        )
        t = target_embedding(local, sim_vector="max_mean")
        _close(t.mean, fx["target_feat_mean"], EMB_ATOL, "target mean")
        _close(t.max, fx["target_feat_max"], EMB_ATOL, "target max")
        _close(t.sim, fx["target_feat"].reshape(-1), SCORE_ATOL, "target feat")
        _set(pred, inputs, "ref")
        loc = location_map(
            torch.from_numpy(fx["target_feat"][0]),
            torch.from_numpy(inputs["ref_features"][0]),
            img_size=pred.model.image_encoder.img_size,
            input_size=tuple(inputs["ref_input_size"]),
            original_size=tuple(inputs["ref_original_size"]),
        )
        _map_checks(loc, fx, "ref_", "persam_f self-prior")
        point = _point(loc.full, fx["ref_positive_point_xy"], True, "training point")
        np.testing.assert_array_equal(point, fx["train_point_coords"])
        out = decode(pred, points_xy=point, point_labels=np.array([1]), multimask=True)
        _close(out.iou, fx["train_iou_pred"], SCORE_ATOL, "training iou")
        _close(out.low_res, fx["train_low_res_logits"], LOGIT_ATOL, "training logits")
        full = out.high_res()
        for i in range(3):
            _masks_match(full[i], fx["train_masks"][i], f"training mask {i}")
    _check_fit(name, DEFAULT_FIT_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_persam_f_full_fit(name):
    _check_fit(name, None)


@pytest.mark.parametrize("name", CASES)
def test_persam_f_query_side(name):
    c = _case(name)
    fx, inputs, pred = c["persam_f"], c["inputs"], _pred(name)
    with torch.inference_mode():
        _set(pred, inputs, "test")
        loc = location_map(
            torch.from_numpy(fx["target_feat"][0]),
            torch.from_numpy(inputs["test_features"][0]),
            img_size=pred.model.image_encoder.img_size,
            input_size=tuple(inputs["test_input_size"]),
            original_size=tuple(inputs["test_original_size"]),
        )
        _map_checks(loc, fx, "", "persam_f query")
        point = _point(loc.full, fx["positive_point_xy"], True, "query point")
        labels = np.array([1])
        weights = torch.from_numpy(fx["mask_weights"])
        out1, seen = _decode_recorded(
            pred, fx, 1, points_xy=point, point_labels=labels, multimask=True
        )
        _check_pass(
            pred, fx, 1, out1, seen, points=point, labels=labels, box=None, what="persam_f pass 1"
        )
        mixed_low = mix_logits(out1.low_res, weights)
        _close(mixed_low, fx["pass1_weighted_logit_lowres"], LOGIT_ATOL, "weighted low-res logit")
        mixed = mix_logits(out1.high_res(), weights)
        _masks_match(mixed, fx["pass1_weighted_mask"], "weighted mask")
        box = box_from_mask(fx["pass1_weighted_mask"])
        np.testing.assert_array_equal(box_from_mask(mixed > 0), box, err_msg="pass 2 box")
        out2, seen = _decode_recorded(
            pred,
            fx,
            2,
            points_xy=point,
            point_labels=labels,
            box_xyxy=box,
            mask_input=torch.from_numpy(fx["pass1_weighted_logit_lowres"]),
        )
        _check_pass(
            pred, fx, 2, out2, seen, points=point, labels=labels, box=box, what="persam_f pass 2"
        )
        b2 = _best(out2.iou, int(fx["pass2_best_idx"]), "pass 2 choice")
        _close(
            out2.low_res[b2 : b2 + 1],
            fx["pass2_low_res_logits_best"],
            LOGIT_ATOL,
            "pass 2 best logits",
        )
        box = box_from_mask(fx["pass2_masks"][b2])
        np.testing.assert_array_equal(
            box_from_mask(out2.high_res(b2) > 0), box, err_msg="pass 3 box"
        )
        out3, seen = _decode_recorded(
            pred,
            fx,
            3,
            points_xy=point,
            point_labels=labels,
            box_xyxy=box,
            mask_input=torch.from_numpy(fx["pass2_low_res_logits_best"][0]),
        )
        _check_pass(
            pred, fx, 3, out3, seen, points=point, labels=labels, box=box, what="persam_f pass 3"
        )
        b3 = _best(out3.iou, int(fx["pass3_best_idx"]), "pass 3 choice")
        final = (out3.high_res(b3) > 0).numpy()
    assert _iou(final, fx["final_mask"]) >= 0.999


# ------------------------------------------------------------------------------------------ end to
# end
def _smallest_case() -> str:
    def pixels(name):
        meta = json.loads((PARITY / name / "meta.json").read_text())
        shapes = [
            v.get("decoded_shape_hwc", [4096, 4096])
            for v in meta.get("inputs", {}).values()
            if isinstance(v, dict) and "file" in v and "mask" not in v["file"]
        ]
        return sum(h * w for h, w, *_ in shapes)

    return min(CASES, key=pixels)


def _run_end_to_end(name: str, method: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}_{method}.png"
    mask = (run_persam if method == "persam" else run_persam_f)(PARITY / name, out)
    from PIL import Image

    written = np.asarray(Image.open(out))
    assert set(np.unique(written)) <= {0, 255}
    np.testing.assert_array_equal(written == 255, mask)
    expected = _case(name)[method]["final_mask"]
    assert written.shape == expected.shape
    assert _iou(mask, expected) >= 0.999


def test_end_to_end_persam_one_case(tmp_path):
    _run_end_to_end(_smallest_case(), "persam", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["persam", "persam_f"])
@pytest.mark.parametrize("name", CASES)
def test_end_to_end_every_case(name, method, tmp_path):
    _run_end_to_end(name, method, tmp_path)
