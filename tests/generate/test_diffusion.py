"""Diffusion mask generator: schedule and DDIM sampler, network shapes and caches, CFG null condition,
HF-layout save/load, the stage / method (uncertainty, determinism, contexts), the training task, the UNet path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from incontext.episode import Context, Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.generate.diffusion import DiffusionMethod, DiffusionStage, binary_entropy, load_diffusion
from incontext.generate.diffusion_net import (
    DiffusionConfig,
    DiffusionSegModel,
    SupportCode,
    matching_prior,
)
from incontext.generate.diffusion_process import (
    alpha_bar,
    ddim_sample,
    make_scheduler,
    q_sample,
    t_from_alpha_bar,
)
from incontext.generate.diffusion_task import DiffusionTask, MixedShotEpisodes, dice_loss
from incontext.train.data import TrainItem, stack

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and on a shared CPU two OpenMP threads can be 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(image_size=16, patch=4, encoder_widths=[8, 8, 8], encoder_blocks=[1, 1, 1], feature_dim=8,
            width=16, blocks=1, heads=2, time_dim=16)


def _model(seed: int = 0, **over) -> DiffusionSegModel:
    torch.manual_seed(seed)
    return DiffusionSegModel({**TINY, **over}).eval()


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Zero-initialised output projections make a fresh model ignore its supports; give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _support(seed: int, h: int = 30, w: int = 40) -> Support:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    m = np.zeros((h, w), np.uint8)
    m[5:20, 8:30] = 1
    return Support.from_arrays(img, m)


# ------------------------------------------------------------------------------------------ process
def test_alpha_bar_inverse_and_endpoints():
    t = torch.linspace(0, 1, 101)
    assert torch.allclose(t_from_alpha_bar(alpha_bar(t)), t, atol=1e-3)
    assert alpha_bar(torch.tensor([0.0])).item() > 0.9998 and alpha_bar(torch.tensor([1.0])).item() < 1e-12


def test_diffusers_scheduler_discretises_the_same_cosine():
    s = make_scheduler()
    k = torch.arange(0, 990, 7)
    # squaredcos_cap_v2: alphas_cumprod[k] = alpha_bar((k + 1) / T) / alpha_bar(0) (beta capped at 0.999 near 1)
    expect = alpha_bar((k + 1) / 1000.0) / alpha_bar(torch.tensor([0.0]))
    assert torch.allclose(s.alphas_cumprod[k], expect, rtol=1e-3, atol=1e-6)
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]  # trailing spacing: one step starts from pure noise
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]


def test_q_sample_at_pure_noise_and_clean():
    x0, noise = torch.ones(2, 1, 4, 4), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q_sample(x0, torch.tensor([1.0, 1.0]), noise), noise, atol=1e-6)
    sigma0 = (1 - alpha_bar(torch.tensor(0.0))).sqrt()  # cosine schedule: ~0.0126 of noise left at t = 0
    assert torch.allclose(q_sample(x0, torch.tensor([0.0, 0.0]), noise), x0, atol=float(sigma0) * 4)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_with_an_oracle_denoiser_returns_the_mask(steps):
    truth = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    calls = []

    def oracle(x, t, sc):
        calls.append(float(t[0]))
        return (2 * truth - 1) * 20.0

    logits = ddim_sample(oracle, tuple(truth.shape), steps, torch.Generator().manual_seed(1))
    assert torch.equal((logits > 0).float(), truth)
    assert len(calls) == steps and calls[0] == pytest.approx(1.0, abs=1e-3)
    assert all(a > b for a, b in zip(calls, calls[1:]))  # t decreases


def test_one_step_is_one_regression_call_and_self_condition_is_fed_back():
    seen = []

    def f(x, t, sc):
        seen.append(sc.clone())
        return torch.full_like(x, 3.0)

    ddim_sample(f, (1, 1, 4, 4), 3, torch.Generator().manual_seed(0), signal_scale=1.0)
    assert torch.count_nonzero(seen[0]) == 0
    expect = 2 * torch.sigmoid(torch.tensor(3.0)) - 1
    assert torch.allclose(seen[1], torch.full((1, 1, 4, 4), float(expect)))


# ------------------------------------------------------------------------------------------ network
def test_config_errors_name_the_key():
    with pytest.raises(InputError, match="encoder_widths"):
        DiffusionConfig(image_size=16, patch=4, encoder_widths=[8, 8])
    with pytest.raises(InputError, match="image_size"):
        DiffusionConfig(image_size=20, patch=4)
    with pytest.raises(InputError, match="denoiser"):
        DiffusionConfig(denoiser="vae")
    with pytest.raises(InputError, match="support_pool"):
        DiffusionConfig(image_size=16, patch=4, encoder_widths=[8, 8, 8], encoder_blocks=[1, 1, 1],
                        support_pool=3)
    with pytest.raises(InputError, match="unknown key"):
        DiffusionConfig.from_dict({"img_size": 3})


def _batch(b=2, k=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([[True, False, False], [True, True, True]])[:b, :k]
    masks = (torch.rand(b, k, s, s, generator=g) > 0.6).float()
    return dict(query=torch.rand(b, 3, s, s, generator=g), supports=torch.rand(b, k, 3, s, s, generator=g),
                support_masks=masks, shot_valid=valid, x_t=torch.randn(b, 1, s, s, generator=g),
                t=torch.tensor([1.0, 0.3])[:b], drop=torch.zeros(b, dtype=torch.bool),
                self_cond_mask=torch.zeros(b, dtype=torch.bool))


def test_training_forward_shapes_and_padding_shots_are_ignored():
    model = _model()
    _randomise(model)
    batch = _batch()
    out, prior_logits = model(**batch)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all() and prior_logits.shape == (2, 1, 4, 4)
    garbage = dict(batch, supports=batch["supports"].clone(), support_masks=batch["support_masks"].clone())
    garbage["supports"][0, 1:] = 0.123  # padding shots of sample 0
    garbage["support_masks"][0, 1:] = 1.0
    assert torch.allclose(model(**garbage)[0], out, atol=1e-6)


def test_dropped_condition_ignores_the_supports():
    model = _model()
    _randomise(model)
    b1, b2 = _batch(seed=0), _batch(seed=5)
    b2.update(query=b1["query"], x_t=b1["x_t"])
    drop = torch.ones(2, dtype=torch.bool)
    o1 = model(**dict(b1, drop=drop))[0]
    o2 = model(**dict(b2, drop=drop))[0]
    assert torch.allclose(o1, o2, atol=1e-5)
    assert not torch.allclose(model(**b1)[0], model(**b2)[0], atol=1e-3)


@pytest.mark.parametrize("pool", [1, 2])
def test_cached_support_kv_gives_identical_predictions(pool):
    model = _model(support_pool=pool)
    _randomise(model)
    feats = model.encode_images(torch.rand(2, 3, 16, 16))
    masks = (torch.rand(1, 2, 16, 16) > 0.5).float()
    cached = model.encode_supports(feats[None], masks, with_kv=True)
    fresh = model.encode_supports(feats[None], masks, with_kv=False)
    assert cached.tokens.shape == (1, 1 + 2 * 16 // pool**2, 16) and cached.bank.shape == (1, 2 * 16, 8)
    q = model.encode_images(torch.rand(1, 3, 16, 16))
    cond = model.condition(q, cached)
    x, t, sc = torch.randn(1, 1, 16, 16), torch.tensor([0.5]), torch.zeros(1, 1, 16, 16)
    assert torch.allclose(model.denoise(x, t, sc, cond, cached), model.denoise(x, t, sc, cond, fresh), atol=1e-6)


def test_matching_prior_is_one_where_the_query_copies_a_foreground_token():
    bank = torch.nn.functional.normalize(torch.randn(1, 4, 6), dim=-1)
    sup = SupportCode(tokens=torch.zeros(1, 5, 2), valid=torch.ones(1, 5, dtype=torch.bool),
                      proto=bank[:, 0], bank=bank, fg=torch.tensor([[True, False, False, False]]),
                      bg=torch.tensor([[False, False, True, True]]))
    q = torch.stack([bank[0, 0], bank[0, 2]], dim=1).view(1, 6, 1, 2) * 3.0  # unnormalised copies
    prior = matching_prior(q, sup)
    assert prior.shape == (1, 3, 1, 2)
    assert prior[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # prototype
    assert prior[0, 1, 0, 0] == pytest.approx(1.0, abs=1e-5)  # nearest foreground token
    assert prior[0, 2, 0, 1] == pytest.approx(1.0, abs=1e-5)  # nearest background token


def test_save_load_roundtrip_and_errors(tmp_path):
    model = _model()
    _randomise(model)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = load_diffusion(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsNotFoundError, match="checkpoint="):
        load_diffusion(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "seggpt"}))
    with pytest.raises(InputError, match="model_type"):
        load_diffusion(tmp_path / "m")


# ------------------------------------------------------------------------------------------ stage / method
def _method(**kw) -> DiffusionMethod:
    model = _model()
    _randomise(model)
    return DiffusionMethod(model=model, **kw)


def test_method_segments_with_uncertainty_at_query_size():
    m = _method(steps=2, n_samples=3, uncertainty="std")
    q = np.random.default_rng(3).integers(0, 255, (37, 45, 3), dtype=np.uint8)
    pred = m.segment(q, [_support(1), _support(2)])
    unc = pred.extras["uncertainty"]
    assert pred.mask.shape == (37, 45) and pred.scores[1].shape == (37, 45)
    assert unc.shape == (37, 45) and unc.dtype == np.float32 and 0 <= unc.min() and unc.max() <= 1
    assert unc.max() > 0  # three different noise draws disagree somewhere
    assert pred.extras["diffusion"] == {"steps": 2, "n_samples": 3, "guidance_scale": 1.0}


def test_entropy_uncertainty_is_of_the_mean_probability():
    m = _method(steps=1)
    q = np.random.default_rng(4).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    pred = m.segment(q, [_support(1)])
    expect = binary_entropy(torch.from_numpy(pred.scores[1])).numpy()
    assert np.allclose(pred.extras["uncertainty"], expect, atol=1e-5)


def test_same_seed_same_answer_and_saved_context_reproduces(tmp_path):
    m = _method(steps=2, n_samples=2)
    q = np.random.default_rng(5).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    ctx = m.prepare([_support(1), _support(2)])
    a = m.segment(q, ctx).scores[1]
    assert np.array_equal(a, m.segment(q, ctx).scores[1])
    ctx.save(tmp_path / "c.safetensors")
    b = m.segment(q, Context.load(tmp_path / "c.safetensors")).scores[1]
    assert np.allclose(a, b, atol=1e-6)
    other = _method(steps=2, n_samples=2, seed=7).segment(q, ctx).scores[1]
    assert not np.allclose(a, other)


def test_guidance_changes_the_output_and_one_is_off():
    q = np.random.default_rng(6).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    sup = [_support(1)]
    base = _method().segment(q, sup).scores[1]
    assert np.allclose(_method(guidance_scale=1.0).segment(q, sup).scores[1], base)
    assert not np.allclose(_method(guidance_scale=3.0).segment(q, sup).scores[1], base, atol=1e-4)


def test_stage_argument_errors(tmp_path):
    model = _model()
    for kw, key in [({"steps": 0}, "steps"), ({"n_samples": 0}, "n_samples"),
                    ({"uncertainty": "var"}, "uncertainty"), ({"uncertainty": "std"}, "n_samples >= 2"),
                    ({"max_shots": 0}, "max_shots")]:
        with pytest.raises(InputError, match=key):
            DiffusionStage(model=model, **kw)
    with pytest.raises(WeightsNotFoundError, match="diffusion_tiny"):
        DiffusionStage(checkpoint=tmp_path / "missing")


def test_build_from_registry_with_a_random_model():
    from incontext.registry import build

    m = build("diffusion", model_config=TINY, steps=2)
    pred = m.segment(*_episode())
    assert pred.mask.shape == (30, 40) and "uncertainty" in pred.extras


def _episode():
    s = _support(1)
    return s.image, [s]


# ------------------------------------------------------------------------------------------ training task
def _item(seed: int, k: int) -> TrainItem:
    sups = [_support(seed + j) for j in range(k)]
    q = _support(seed + 10)
    return TrainItem(q.image, q.mask, sups)


def test_task_samples_pad_shots_and_loss_learns():
    task = DiffusionTask(model=TINY, max_shots=3, p_self_cond=0.5, p_uncond=0.1)
    samples = [task.make_sample(_item(i, k), np.random.default_rng(i)) for i, k in enumerate([1, 3, 2, 1])]
    assert samples[0]["supports"].shape == (3, 3, 16, 16) and samples[0]["supports"].dtype == torch.uint8
    assert samples[0]["shot_valid"].tolist() == [True, False, False]
    assert samples[1]["shot_valid"].tolist() == [True, True, True]
    qm = samples[0]["query_mask"]
    assert qm.shape == (1, 16, 16) and set(qm.unique().tolist()) <= {0, 1}
    batch = stack(samples)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    losses = []
    for step in range(40):  # a fixed batch: the loss must fall (the model can at least fit it)
        torch.manual_seed(step)
        loss, logs = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(logs) == {"bce", "dice", "prior_bce", "iou_t1"}
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_dice_loss_values():
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :] = 1
    assert dice_loss(torch.where(y > 0, 50.0, -50.0), y).item() == pytest.approx(0.0, abs=1e-4)
    assert dice_loss(torch.where(y > 0, -50.0, 50.0), y).item() == pytest.approx(1 - 1 / 17, abs=1e-4)  # eps = 1


def test_mixed_shot_episodes_share_queries_and_vary_k():
    data = MixedShotEpisodes(size=32, max_shots=3, shot_probs=[0.2, 0.3, 0.5], seed=0)
    ks = [data.shots(i) for i in range(60)]
    assert set(ks) == {1, 2, 3}
    ep = data.episode(4)
    assert len(ep.episode.supports) == ks[4]
    one = data.benches[0].episode(4)
    assert np.array_equal(ep.episode.query, one.episode.query)
    assert np.array_equal(ep.episode.supports[0].image, one.episode.supports[0].image)
    with pytest.raises(ValueError, match="shot_probs"):
        MixedShotEpisodes(size=32, max_shots=2, shot_probs=[1.0])


def test_task_segmenter_wraps_the_live_model():
    task = DiffusionTask(model=TINY, eval_steps=2)
    model = task.build_model()
    seg = task.segmenter(model, torch.device("cpu"))
    assert seg.stages["generate"].model is model and seg.stages["generate"].steps == 2


# ------------------------------------------------------------------------------------------ UNet path
UNET = dict(block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=8,
            attention_head_dim=4, cross_attention_dim=24)


def test_unet_denoiser_forward_shapes_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = DiffusionSegModel({**TINY, "image_size": 32, "denoiser": "unet", "unet": UNET}).eval()
    assert model.denoiser.unet.config.in_channels == 2 * 16 + 8 + 3
    batch = _batch(s=32)
    out = model(**batch)[0]
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "u")
    again = load_diffusion(tmp_path / "u")
    assert torch.allclose(again(**batch)[0], out, atol=1e-5)
    pred = DiffusionMethod(model=again, steps=2).segment(*_episode())
    assert pred.mask.shape == (30, 40)


def test_unet_from_a_local_pretrained_folder_gets_new_input_channels(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    src = UNet2DConditionModel(**{**UNET, "in_channels": 4, "out_channels": 4})  # an SD-like 4-channel UNet
    src.save_pretrained(str(tmp_path / "unet"))
    model = DiffusionSegModel({**TINY, "image_size": 32, "denoiser": "unet",
                               "unet_folder": str(tmp_path / "unet")})
    conv = model.denoiser.unet.conv_in
    assert conv.in_channels == 43 and torch.equal(conv.weight[:, :4], src.conv_in.weight)
    assert torch.count_nonzero(conv.weight[:, 4:]) == 0  # new channels start at zero (Ref-LDM-Seg)
    assert model.config.unet_folder is None and model.config.unet["in_channels"] == 43
    assert model(**_batch(s=32))[0].shape == (2, 1, 32, 32)
    with pytest.raises(WeightsNotFoundError, match="unet_folder"):
        DiffusionSegModel({**TINY, "denoiser": "unet", "unet_folder": str(tmp_path / "none")})


def test_infer_outputs_include_the_uncertainty_png(tmp_path):
    from PIL import Image

    from incontext.cli import write_outputs

    m = _method(steps=2, n_samples=2, uncertainty="std")
    image, sup = _episode()
    pred = m.segment(image, sup)
    summary = write_outputs(tmp_path, "q", image, pred, save_scores=False)
    png = np.array(Image.open(tmp_path / "q_uncertainty.png"))
    assert png.shape == image.shape[:2]
    assert np.abs(png.astype(float) - 255 * pred.extras["uncertainty"]).max() <= 1.0
    assert summary["extras"]["diffusion"]["n_samples"] == 2 and "uncertainty" not in summary["extras"]


MATCH = {"size": 32, "stride": 4, "bg_prototypes": 3, "temperature": 10.0}


def test_match_prior_model_trains_and_runs_behind_the_prototype_stage():
    from incontext.match.prototype import PrototypeMatch
    from incontext.pipeline import Carry

    task = DiffusionTask(model={**TINY, "match_prior": MATCH}, max_shots=2)
    sample = task.make_sample(_item(0, 2), np.random.default_rng(0))
    assert sample["match"].shape == (1, 4, 4) and 0 <= sample["match"].min() and sample["match"].max() <= 1
    model = task.build_model()
    assert model.denoiser.inp.in_channels == 2 * 16 + 8 + 1 + 3
    loss, _ = task.loss(model, stack([sample, task.make_sample(_item(3, 1), np.random.default_rng(1))]))
    loss.backward()
    method = DiffusionMethod(model=model.eval(), steps=2)
    assert isinstance(method.stages["match"], PrototypeMatch)
    pred = method.segment(*_episode())
    # the generate stage decides: the match stage's own mask is cleared, the mask is prob > threshold
    assert np.array_equal(pred.mask == 1, pred.scores[1] > 0.5)
    stage = method.stages["generate"]
    with pytest.raises(InputError, match="carry.prior"):
        stage(Carry(query=_episode()[0], cache={}), stage.prepare(_episode()[1]))


def test_train_loop_checkpoints_resumes_exactly_and_loads_as_the_method(tmp_path):
    """The project's trainer with this task: HF-layout checkpoints, evaluation, and a run interrupted after
    step 1 (time budget) and resumed equals the uninterrupted run bit for bit (match prior included)."""
    from safetensors.torch import load_file

    from incontext.registry import build
    from incontext.train.loop import TrainConfig, train

    def run(out, resume=False, **kw):
        cfg = TrainConfig(**{**dict(max_steps=3, batch_size=2, warmup_steps=1, lr=1e-3, log_every=1,
                                    eval_every=3, save_every=3, progress=False, threads=1), **kw})
        task = DiffusionTask(model={**TINY, "image_size": 32, "match_prior": MATCH}, max_shots=2)
        data = MixedShotEpisodes(size=32, max_shots=2)
        return train(task, data, cfg, out, resume=resume, eval_data=_EvalTwo(), evaluate_fn=_eval_iou)

    full = run(tmp_path / "full")
    assert full["step"] == 3
    run(tmp_path / "cut", max_minutes=1e-9)  # stops after step 1
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed["step"] == 3
    a = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/last/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = build("diffusion", checkpoint=str(tmp_path / "full/checkpoints/last"), steps=2)
    assert "match" in m.stages and m.segment(*_episode()).mask.shape == (30, 40)


class _EvalTwo(list):
    def __init__(self):
        super().__init__([_item(20, 1), _item(30, 2)])


def _eval_iou(method, items) -> dict:
    ious = []
    for it in items:
        pred = method.segment(it.query, [(s.image, s.mask) for s in it.supports])
        gt, pm = it.query_mask > 0, pred.mask > 0
        ious.append((gt & pm).sum() / max((gt | pm).sum(), 1))
    return {"miou": 100 * float(np.mean(ious))}
