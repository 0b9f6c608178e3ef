"""generate=fuse (several generators, one fused map) and the generalist preset built from tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from incontext.episode import Context, Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.generate.fusion import FuseGenerators
from incontext.pipeline import Carry, Pipeline
from incontext.registry import build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ConstGen:
    """A generate stage that paints a fixed map and remembers what it saw."""

    def __init__(self, value: np.ndarray, tag: str = "x") -> None:
        self.value, self.tag, self.seen_prior, self.prepared = value, tag, None, 0

    def prepare(self, supports):
        self.prepared += 1
        return {"k": torch.tensor([len(supports)]), "tag": self.tag}

    def __call__(self, carry, state):
        assert state["tag"] == self.tag and int(state["k"][0]) >= 1
        self.seen_prior = carry.prior
        carry.prob = torch.from_numpy(self.value)
        carry.extras[f"from_{self.tag}"] = True


def _maps(h=8, w=10):
    a = np.zeros((h, w), np.float32)
    a[:, :5] = 1.0
    b = np.zeros((h, w), np.float32)
    b[:, :3] = 0.8
    return a, b


def test_weighted_mean_scores_and_prior_reach_every_member():
    a, b = _maps()
    ga, gb = ConstGen(a, "a"), ConstGen(b, "b")
    fuse = FuseGenerators({"a": ga, "b": gb}, weights={"a": 3.0, "b": 1.0})
    sup = [Support(np.zeros((8, 10, 3), np.uint8), np.ones((8, 10), np.uint8))]
    state = fuse.prepare(sup)
    assert set(state) == {"a.k", "a.tag", "b.k", "b.tag"}
    prior = torch.full((4, 5), 0.3)
    carry = Carry(query=np.zeros((8, 10, 3), np.uint8), cache={}, prior=prior, mask=torch.ones(8, 10, dtype=bool))
    fuse(carry, state)
    assert ga.seen_prior is prior and gb.seen_prior is prior
    np.testing.assert_allclose(carry.prob.numpy(), 0.75 * a + 0.25 * b, atol=1e-6)
    assert carry.mask is None  # the decision is the fused map's now
    rep = carry.extras["generators"]
    assert rep["a"]["weight"] == 0.75 and rep["b"]["weight"] == 0.25
    assert rep["a"]["agreement"] == 1.0 and rep["b"]["agreement"] == pytest.approx(3 / 5)
    assert rep["b"]["confidence"] == pytest.approx(0.8) and rep["a"]["fg_fraction"] == pytest.approx(0.5)
    assert carry.extras["from_a"] and carry.extras["from_b"] and carry.extras["uncertainty"].shape == (8, 10)


def test_match_member_zero_weight_skips_and_bad_settings():
    a, b = _maps()
    gb = ConstGen(b, "b")
    fuse = FuseGenerators({"a": ConstGen(a, "a"), "b": gb}, weights={"b": 0.0, "match": 1.0})
    state = fuse.prepare([Support(np.zeros((8, 10, 3), np.uint8), np.ones((8, 10), np.uint8))])
    assert gb.prepared == 0 and not any(k.startswith("b.") for k in state)
    carry = Carry(query=np.zeros((8, 10, 3), np.uint8), cache={}, prob=torch.full((8, 10), 0.2))
    fuse(carry, state)
    np.testing.assert_allclose(carry.prob.numpy(), 0.5 * a + 0.1, atol=1e-6)
    assert set(carry.extras["generators"]) == {"a", "match"}
    with pytest.raises(InputError, match="not members"):
        FuseGenerators({"a": gb}, weights={"c": 1.0})
    with pytest.raises(InputError, match="reserved"):
        FuseGenerators({"match": gb})
    with pytest.raises(InputError, match="empty"):
        FuseGenerators({})
    with pytest.raises(InputError, match="no match stage"):
        FuseGenerators({"a": gb}, weights={"match": 1.0})(Carry(query=np.zeros((8, 10, 3), np.uint8), cache={}),
                                                          {"a.k": torch.tensor([1]), "a.tag": "b"})


def test_fusion_in_a_pipeline_saves_and_reloads_its_context(tmp_path):
    a, b = _maps()
    m = Pipeline(name="fz", generate=FuseGenerators({"a": ConstGen(a, "a"), "b": ConstGen(b, "b")}))
    sup = [(np.zeros((8, 10, 3), np.uint8), np.ones((8, 10), np.uint8))]
    ctx = m.prepare(sup)
    ctx.save(tmp_path / "c.safetensors")
    p1 = m.segment(np.zeros((8, 10, 3), np.uint8), Context.load(tmp_path / "c.safetensors"))
    p2 = m.segment(np.zeros((8, 10, 3), np.uint8), sup)
    assert np.array_equal(p1.mask, p2.mask) and p1.mask[:, :3].all() and not p1.mask[:, 3:].any()  # (1 + 0) / 2 is not > 0.5
    assert p1.extras["stages"] == ["generate"] and set(p1.extras["generators"]) == {"a", "b"}


# ------------------------------------------------------------------ the generalist preset on tiny models
TINY_DIFF = ("{image_size:16,patch:4,encoder_widths:[8,8,8],encoder_blocks:[1,1,1],feature_dim:8,width:16,"
             "blocks:1,heads:2,time_dim:16,match_prior:{size:32,stride:4,bg_prototypes:3,temperature:10.0}}")
TINY_SAM = ("{_target_:incontext.backbones.sam.build_sam,name:sam_tiny,weights:random,seed:0,"
            "arch:{image_size:64,vit_patch_size:8,encoder_embed_dim:16,encoder_depth:1,encoder_num_heads:2,"
            "encoder_global_attn_indexes:[0],encoder_window_size:4,prompt_embed_dim:16,mask_in_chans:4,"
            "decoder_transformer_mlp_dim:32,decoder_transformer_num_heads:2,iou_head_hidden_dim:16}}")
TINY = [f"generate.generators.diffusion.model_config={TINY_DIFF}"]
SAM_ARCH = dict(image_size=64, vit_patch_size=8, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2,
                encoder_global_attn_indexes=[0], encoder_window_size=4, prompt_embed_dim=16, mask_in_chans=4,
                decoder_transformer_mlp_dim=32, decoder_transformer_num_heads=2, iou_head_hidden_dim=16)
SAM = {"refine.sam": {"_target_": "incontext.backbones.sam.build_sam", "name": "sam_tiny", "weights": "random",
                      "seed": 0, "arch": SAM_ARCH}}


def _demo():
    from incontext.io import load_pairs_from_dir, read_image

    return read_image(REPO / "examples/demo/query.png"), load_pairs_from_dir(REPO / "examples/demo/supports")


def test_generalist_composes_all_stages_and_reports_them():
    m = build("generalist", TINY + ["retriever=null"], **SAM)
    assert list(m.stages) == ["match", "generate", "refine"]
    assert type(m.stages["match"]).__name__ == "PrototypeMatch"  # the prior the generator was trained with
    q, pairs = _demo()
    p = m.segment(q, pairs)
    assert p.mask.shape == q.shape[:2]
    ex = p.extras
    assert ex["stages"] == ["match", "generate", "refine"]
    assert set(ex["stage_scores"]) >= {"match", "generate"} and "diffusion" in ex["generators"]
    assert {"parts", "accepted", "pred_iou", "agreement", "sam"} <= set(ex["refine_sam"])
    assert {"match_s", "generate_s", "refine_s"} <= set(ex["timings"])


def test_generalist_retrieves_missing_supports():
    m = build("generalist", TINY + ["shots=2"], **SAM)  # the shipped prompts_bank/synthetic-mini
    q, pairs = _demo()
    p = m.segment(q, pairs[:1])
    assert len(p.extras["retrieved_supports"]) == 1
    p0 = m.segment(q, [])
    names = p0.extras["retrieved_supports"]
    assert len(names) == 2 and all(n.startswith("bank:") for n in names)
    # evaluate's supports=none: the method gets no supports and retrieves all of them
    from incontext.data.synthetic import SyntheticBenchmark
    from incontext.evaluate import evaluate

    r = evaluate(m, SyntheticBenchmark(size=64, shots=1, episodes=2, seed=0), progress=False, give_supports=False)
    assert r["episodes"] == 2 and 0.0 <= r["miou"] <= 100.0


def test_generalist_real_fails_with_the_missing_weights_message():
    from incontext.evaluate import _user_error

    with pytest.raises(Exception) as info:  # Hydra wraps constructor errors; the user sees the cause
        build("generalist_real")
    err = _user_error(info.value)
    assert isinstance(err, WeightsNotFoundError)
    assert "sam_vit_h_4b8939.pth" in str(err) and "refine.sam.weights" in str(err)


def test_infer_runs_the_generalist_on_the_demo(tmp_path):
    """infer.py's code path (in-process: a subprocess pays torch's import again)."""
    from hydra import compose, initialize_config_dir

    from incontext.cli import run_infer

    args = [f"method.{TINY[0]}", f"++method.refine.sam={TINY_SAM}", "method.retriever=null"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=["method=generalist", "demo=true",
                                                       f"output_dir={tmp_path / 'out'}", *args])
    assert run_infer(cfg) == 0
    assert (tmp_path / "out" / "query_mask.png").is_file() and (tmp_path / "out" / "query.json").is_file()


class QueryRed:
    """A generate stage whose map is the query's red channel (so it follows the query when mirrored)."""

    def prepare(self, supports):
        return {}

    def __call__(self, carry, state):
        carry.prob = torch.from_numpy(carry.query[..., 0].astype(np.float32) / 255.0)


def test_hflip_averages_the_mirrored_run_and_leaves_equivariant_members_unchanged():
    a, _ = _maps()
    rng = np.random.default_rng(0)
    q = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
    fuse = FuseGenerators({"fixed": ConstGen(a, "a"), "red": QueryRed()}, weights={"red": 0.0}, hflip=True)
    carry = Carry(query=q, cache={})
    fuse(carry, fuse.prepare([Support(q, np.ones((8, 10), np.uint8))]))
    np.testing.assert_allclose(carry.prob.numpy(), (a + a[:, ::-1]) / 2, atol=1e-6)  # a fixed map is not
    fuse2 = FuseGenerators({"red": QueryRed()}, hflip=True)
    carry2 = Carry(query=q, cache={})
    fuse2(carry2, {})
    np.testing.assert_allclose(carry2.prob.numpy(), q[..., 0] / 255.0, atol=1e-6)
    assert "fuse.hflip" in carry2.cache


def test_sam_refine_multimask_keeps_the_best_of_three():
    from incontext.backbones.sam import BatchedSamPredictor, SamArch, build_sam_model
    from incontext.refine.sam_refine import SamRefine

    torch.manual_seed(0)
    sam = BatchedSamPredictor(build_sam_model(SamArch(**{**SAM_ARCH, "encoder_global_attn_indexes": (0,)})))
    rng = np.random.default_rng(0)
    q = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    coarse = np.zeros((48, 64), bool)
    coarse[8:30, 10:40] = True
    prob = torch.from_numpy(np.where(coarse, 0.9, 0.1).astype(np.float32))
    stage = SamRefine(sam, min_area=0.01, min_agreement=0.0, multimask=True)
    carry = Carry(query=q, cache={}, prob=prob)
    stage(carry, {})
    part = stage.parts(coarse)[0][0]
    call = sam.decode(np.array([[[19, 24]]], np.float32), np.ones((1, 1), np.int64), boxes=None, multimask_output=True)
    assert call.masks.shape[1] == 3  # SAM's three answers exist for the stage to choose from
    res = stage._decode([part], carry)
    cand = (res.logits[0] > sam.model.mask_threshold).numpy()
    scores = [float(res.iou_pred[0, j]) * (np.logical_and(c, part).sum() / max(np.logical_or(c, part).sum(), 1))
              for j, c in enumerate(cand)]
    best = cand[int(np.argmax(scores))]
    np.testing.assert_array_equal(carry.mask.numpy(), best)
    assert carry.extras["refine_sam"]["pred_iou"][0] == pytest.approx(float(res.iou_pred[0, int(np.argmax(scores))]))
