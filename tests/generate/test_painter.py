"""Painter generator: canvas/colour coding, decoding, k-shot ensembles, HF-layout loading, training sample/loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from incontext.episode import Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.generate import canvas
from incontext.generate.painter import PainterStage, build_seggpt, load_seggpt, paint
from incontext.generate import painter as painter_mod
from incontext.pipeline import Carry

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=[64, 32], patch_size=8,
            pretrain_image_size=32, merge_index=0, intermediate_hidden_state_indices=[0, 1],
            decoder_hidden_size=8, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny SegGPT saved exactly as users' BAAI/seggpt-vit-large folders are laid out."""
    torch.manual_seed(0)
    model = build_seggpt(TINY)
    path = tmp_path_factory.mktemp("seggpt_tiny")
    model.save_pretrained(str(path))
    return path


def _supports(n: int, seed: int = 0) -> list[Support]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
        m = np.zeros((40, 52), np.uint8)
        m[10:30, 5:25] = 1
        out.append(Support.from_arrays(img, m))
    return out


# ------------------------------------------------------------------------------------------ colours
@pytest.mark.parametrize("n", [1, 3, 20, 150])
def test_painter_palette_matches_transformers_build_palette(n):
    from transformers.models.seggpt.image_processing_seggpt import build_palette

    assert canvas.painter_palette(n).tolist() == [list(c) for c in build_palette(n)]


def test_painter_palette_reference_values():
    # seggpt_painter.md section 3: n = 3 -> black, white, (255,255,127), (255,127,255)
    assert canvas.painter_palette(3).tolist() == [[0, 0, 0], [255, 255, 255], [255, 255, 127], [255, 127, 255]]


def test_random_palette_is_seeded_and_separated():
    a = canvas.random_palette(4, np.random.default_rng(3), min_distance=80)
    b = canvas.random_palette(4, np.random.default_rng(3), min_distance=80)
    assert (a == b).all() and a.shape == (5, 3) and (a[0] == 0).all()
    d = np.linalg.norm(a[:, None].astype(float) - a[None].astype(float), axis=-1)
    assert d[~np.eye(5, dtype=bool)].min() >= 80
    bg = canvas.random_palette(1, np.random.default_rng(0), random_background=True)[0]
    assert bg.any()


def test_encode_then_decode_roundtrip_exact():
    labels = np.random.default_rng(0).integers(0, 6, (17, 23))
    pal = canvas.painter_palette(5)
    rgb = torch.from_numpy(canvas.encode_mask(labels, pal)).permute(2, 0, 1).float() / 255
    assert (canvas.nearest_colour(rgb, pal, (17, 23)).numpy() == labels).all()
    scores = canvas.palette_scores(rgb, pal, (17, 23))
    assert torch.allclose(scores.sum(0), torch.ones(17, 23))
    assert (scores.argmax(0).numpy() == labels).all()
    with pytest.raises(ValueError, match="no colour"):
        canvas.encode_mask(labels + 10, pal)


def test_binary_score_is_mean_rgb_for_black_white():
    rgb = torch.rand(3, 8, 8)
    pal = canvas.binary_palette()
    s = canvas.binary_score(rgb, pal[0], pal[1], (8, 8))
    assert torch.allclose(s, rgb.mean(0), atol=1e-6)  # SegGPT's official rule: mean RGB > 0.5
    # score > 0.5 <=> nearer to white than to black
    assert ((s > 0.5) == (canvas.nearest_colour(rgb, pal, (8, 8)) == 1)).all()


def test_model_space_roundtrip():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    x = canvas.to_model(rgb)
    assert x.shape == (3, 5, 6)
    back = (canvas.denormalise(x) * 255).round().permute(1, 2, 0).numpy()
    assert (back == rgb).all()


def test_tile_and_untile():
    items = [np.full((10, 14), i + 1, np.uint8) for i in range(3)]
    t = canvas.tile(items, (32, 32), is_mask=True)
    assert t.shape == (32, 32) and t[0, 0] == 1 and t[0, 31] == 2 and t[31, 0] == 3 and t[31, 31] == 1
    cell = torch.arange(4.0).view(1, 2, 2).repeat(3, 1, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.allclose(canvas.untile_mean(cell, 2), torch.full((3, 8, 8), 1.5))


def test_decoding_matches_transformers_post_processing(tiny_dir):
    """At the cell's own size (no resize) our nearest-palette decoding equals SegGptImageProcessor's."""
    from transformers import SegGptImageProcessor

    torch.manual_seed(0)
    model = load_seggpt(tiny_dir)
    h, w = 32, 32
    out = model(pixel_values=torch.randn(1, 3, h, w), prompt_pixel_values=torch.randn(1, 3, h, w),
                prompt_masks=torch.randn(1, 3, h, w))
    proc = SegGptImageProcessor(size={"height": h, "width": w})
    ref = proc.post_process_semantic_segmentation(out, target_sizes=[(h, w)], num_labels=3)[0]
    rgb = canvas.denormalise(out.pred_masks[0, :, h:])
    # HF de-normalises then multiplies by 255 before the distance; argmin is scale-invariant
    ours = canvas.nearest_colour(rgb, canvas.painter_palette(3), (h, w))
    assert (ours == ref).float().mean() > 0.999  # float ties aside


# ------------------------------------------------------------------------------------------ loading
def test_hf_layout_folder_loads_through_user_path(tiny_dir):
    assert (tiny_dir / "config.json").is_file() and (tiny_dir / "model.safetensors").is_file()
    torch.manual_seed(0)
    ref = build_seggpt(TINY).eval()
    loaded = load_seggpt(tiny_dir)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not loaded.training


def test_build_painter_method_from_checkpoint_segments(tiny_dir):
    import incontext

    seg = incontext.build("painter", checkpoint=str(tiny_dir))
    sup = _supports(2)
    q = np.random.default_rng(5).integers(0, 255, (30, 44, 3), dtype=np.uint8)
    pred = seg.segment(q, [(s.image, s.mask) for s in sup])
    assert pred.mask.shape == (30, 44) and pred.mask.dtype == np.uint8
    assert pred.scores[1].shape == (30, 44)
    assert 0.0 <= pred.scores[1].min() <= pred.scores[1].max() <= 1.0
    assert ((pred.scores[1] > 0.5) == (pred.mask == 1)).all()
    # prepare once, segment many: a saved context gives the same answer
    ctx = seg.prepare([(s.image, s.mask) for s in sup])
    assert np.array_equal(seg.segment(q, ctx).mask, pred.mask)


def test_default_seggpt_config_has_release_state_dict_keys():
    """The default SegGptConfig (= BAAI/seggpt-vit-large) has the release's 354 keys; built on meta, instant."""
    from transformers import SegGptConfig, SegGptForImageSegmentation

    with torch.device("meta"):
        full = SegGptForImageSegmentation(SegGptConfig())
    keys = set(full.state_dict())
    assert len(keys) == 354
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(370.7e6, rel=1e-3)
    tiny24 = build_seggpt({**TINY, "num_hidden_layers": 24, "intermediate_hidden_state_indices": [5, 11, 17, 23],
                           "merge_index": 2})
    assert set(tiny24.state_dict()) == keys  # key names do not depend on size


def test_missing_checkpoint_names_file_place_and_key(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError) as e:
        PainterStage(checkpoint=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "model.safetensors" in msg and "nowhere" in msg and "generate.checkpoint" in msg
    assert "huggingface-cli download BAAI/seggpt-vit-large" in msg
    with pytest.raises(WeightsNotFoundError, match="Hugging Face cache"):
        load_seggpt("someone/not-cached-seggpt")
    monkeypatch.setattr(painter_mod, "shipped", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="no weights.*weights/painter_tiny.*experiment=painter_tiny"):
        PainterStage()
    with pytest.raises(InputError, match="ensemble"):
        PainterStage(model_config=TINY, ensemble="average")


def test_no_checkpoint_uses_the_shipped_folder(tiny_dir, monkeypatch):
    """``checkpoint=None`` loads weights/painter_tiny (found through the weights search places)."""
    seen = []
    monkeypatch.setattr(painter_mod, "shipped", lambda name: seen.append(name) or Path(tiny_dir))
    stage = PainterStage()
    assert seen and seen[0] == "painter_tiny"
    ref = load_seggpt(tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(stage.model.state_dict().values(), ref.state_dict().values()))


# ------------------------------------------------------------------------------------------ ensembles
def test_one_shot_never_uses_feature_ensemble(tiny_dir):
    """Quirk 1: transformers' feature ensemble changes a K = 1 output, so paint() must not set it."""
    model = load_seggpt(tiny_dir)
    g = torch.Generator().manual_seed(0)
    q, pi, pm = torch.randn(3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g), \
        torch.randn(1, 3, 32, 32, generator=g)
    ours = paint(model, q, pi, pm)
    plain = model(pixel_values=q[None], prompt_pixel_values=pi, prompt_masks=pm).pred_masks[0, :, 32:]
    assert torch.allclose(ours, canvas.denormalise(plain))


def test_feature_ensemble_for_k_shots(tiny_dir):
    model = load_seggpt(tiny_dir)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 32, 32, generator=g)
    pi, pm = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    ours = paint(model, q, pi, pm)
    ref = model(pixel_values=q[None].repeat(3, 1, 1, 1), prompt_pixel_values=pi, prompt_masks=pm,
                feature_ensemble=True).pred_masks
    assert torch.allclose(ours, canvas.denormalise(ref[0, :, 32:]))
    # the ensemble really mixes the prompts: it differs from each single-prompt answer
    for i in range(3):
        assert not torch.allclose(ours, paint(model, q, pi[i : i + 1], pm[i : i + 1]))
    # the query half is shared across the K canvases (only the seam row differs, via the 3x3 conv)
    assert torch.allclose(ref[0, :, 33:], ref[1, :, 33:], atol=1e-5)


def test_spatial_ensemble_tiles_supports(tiny_dir):
    stage = PainterStage(checkpoint=str(tiny_dir), ensemble="spatial")
    state = stage.prepare(_supports(3))
    assert state["images"].shape == (1, 32, 32, 3) and state["grid"] == 2
    carry = Carry(query=np.zeros((20, 24, 3), np.uint8), cache={})
    stage(carry, state)
    assert carry.prob.shape == (20, 24)
    assert carry.extras["painted"].shape == (16, 16, 3)  # one averaged tile of the 2 x 2 grid
    one = PainterStage(checkpoint=str(tiny_dir), ensemble="spatial").prepare(_supports(1))
    assert one["grid"] == 1  # a single support is plain 1-shot


def test_max_shots_and_feature_state(tiny_dir):
    stage = PainterStage(checkpoint=str(tiny_dir), max_shots=2)
    state = stage.prepare(_supports(4))
    assert state["images"].shape == (2, 32, 32, 3) and state["masks"].shape == (2, 32, 32)
    assert set(np.unique(state["masks"].numpy())) <= {0, 1}


def test_multiclass_labels_in_one_pass(tiny_dir):
    stage = PainterStage(checkpoint=str(tiny_dir))
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    m = np.zeros((40, 40), np.uint8)
    m[:20] = 3
    m[25:, :10] = 7
    labels, scores = stage.segment_labels(img, [Support.from_arrays(img, m)])
    assert labels.shape == (40, 40) and set(np.unique(labels)) <= {0, 3, 7}
    assert scores.shape == (3, 40, 40)
    assert np.allclose(scores.sum(0), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------ training pieces
def test_block_mask_exact_count_and_seeded():
    from incontext.generate.painter_task import block_mask

    for seed in range(5):
        m = block_mask((8, 4), 16, np.random.default_rng(seed))
        assert m.shape == (32,) and m.sum() == 16
    assert (block_mask((8, 4), 16, np.random.default_rng(1)) == block_mask((8, 4), 16, np.random.default_rng(1))).all()


def test_loss_equals_transformers_seggpt_loss_with_equal_mask_counts():
    from transformers.models.seggpt.modeling_seggpt import SegGptLoss

    from incontext.generate.painter_task import block_mask, masked_smooth_l1

    model = build_seggpt(TINY)
    g = torch.Generator().manual_seed(0)
    pm, lab = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    pred = torch.randn(3, 3, 64, 32, generator=g)
    bmp = torch.from_numpy(np.stack([block_mask((8, 4), 16, np.random.default_rng(i)) for i in range(3)]))
    ref = SegGptLoss(model.config)(pm, pred, lab, bmp)
    ours = masked_smooth_l1(pred, torch.cat([pm, lab], 2), bmp, 8, model.config.beta)
    assert torch.allclose(ours, ref, rtol=1e-5)


def test_make_sample_colours_prompt_and_target_alike():
    from incontext.generate.painter_task import PainterTask
    from incontext.train.data import TrainItem

    task = PainterTask(model=TINY, p_lower_half=1.0, hflip=0.0)
    sup = _supports(1)[0]
    item = TrainItem(sup.image, sup.mask, [sup])  # query = support: target colours must equal prompt colours
    s1 = task.make_sample(item, np.random.default_rng(7))
    s2 = task.make_sample(item, np.random.default_rng(7))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert s1["query"].shape == (3, 32, 32) and s1["bool_masked_pos"].shape == (32,)
    assert s1["bool_masked_pos"][16:].all() and not s1["bool_masked_pos"][:16].any()
    assert torch.equal(s1["label"], s1["prompt_mask"])
    fg = canvas.denormalise(s1["label"])[:, 15, 10]  # inside the object
    assert fg.max() > 0.2  # a random colour, not black
    other = task.make_sample(item, np.random.default_rng(8))
    assert not torch.equal(other["label"], s1["label"])  # a new colouring per sample
    loss, _ = task.loss(task.build_model(), {k: v[None] for k, v in s1.items()})
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_self_prompt_uses_the_query_pair_and_never_the_support():
    from incontext.generate.painter_task import PainterTask
    from incontext.train.data import TrainItem

    rng = np.random.default_rng(0)
    img, lab = rng.integers(0, 200, (48, 48, 3), dtype=np.uint8), np.zeros((48, 48), np.uint8)
    lab[8:24, 6:30] = 1
    item = TrainItem(img, lab, [Support(np.full_like(img, 255), lab)])
    task = PainterTask(model=TINY, p_lower_half=1.0, hflip=0.0, p_random_colour=0.0, p_self_prompt=1.0,
                       crop_scale=(1.0, 1.0))
    for seed in range(6):
        s = task.make_sample(item, np.random.default_rng(seed))
        # the prompt shows the query image (a view of it), never the all-white support
        assert canvas.denormalise(s["prompt"]).min() < 0.9
        prompt_fg = (canvas.denormalise(s["prompt_mask"]).mean(0) > 0.5).sum()
        label_fg = (canvas.denormalise(s["label"]).mean(0) > 0.5).sum()
        assert prompt_fg == label_fg > 0  # full-size square crops: the same object, possibly mirrored
    plain = PainterTask(model=TINY, p_lower_half=1.0, hflip=0.0, p_random_colour=0.0)
    assert canvas.denormalise(plain.make_sample(item, np.random.default_rng(0))["prompt"]).min() > 0.9


def test_object_crop_keeps_the_object_and_weights_foreground():
    from incontext.generate.painter_task import PainterTask, object_crop
    from incontext.train.data import TrainItem

    rng = np.random.default_rng(0)
    lab = np.zeros((100, 80), np.uint8)
    lab[80:90, 10:20] = 1
    for _ in range(50):
        img, cut = object_crop(np.zeros((100, 80, 3), np.uint8), lab, (0.3, 1.0), rng)
        assert cut.any() and img.shape[:2] == cut.shape and cut.shape[0] == cut.shape[1] <= 80
    task = PainterTask(model=TINY, p_lower_half=1.0, hflip=0.0, p_crop=1.0, fg_weight=4.0, p_random_colour=0.0)
    sup = _supports(1)[0]
    s = task.make_sample(TrainItem(sup.image, sup.mask, [sup]), np.random.default_rng(3))
    assert set(np.unique(s["weight"].numpy())) == {1.0, 4.0} and s["weight"].shape == (1, 64, 32)
    white = canvas.denormalise(s["label"]).amax(0)
    assert white.max() == pytest.approx(1.0, abs=1e-5) and white.min() == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------------------ matching prior
PRIOR = dict(size=64, stride=4, bg_prototypes=3, temperature=10.0, fg_threshold=0.5)


def test_grey_image_is_a_soft_mask_in_binary_colours():
    g = canvas.grey_image(torch.tensor([[0.0, 0.5], [1.0, 2.0]]))
    assert g.dtype == np.uint8 and g.shape == (2, 2, 3)
    assert g[..., 0].tolist() == [[0, 128], [255, 255]] and (g[..., 0] == g[..., 2]).all()


def test_prior_model_repaints_the_matchers_hint(tmp_path):
    """A checkpoint with ``match_prior`` reads the matcher's prior: the hint fills the query's colour cell and
    nothing is masked (so the painting changes with the hint), and the config survives save/load."""
    torch.manual_seed(0)
    model = build_seggpt({**TINY, "match_prior": PRIOR})
    model.save_pretrained(str(tmp_path))
    stage = PainterStage(checkpoint=str(tmp_path))
    assert stage.matcher is not None and painter_mod.prior_matcher(build_seggpt(TINY)) is None
    sup = _supports(2)
    query = sup[1].image
    carry = Carry(query=query, cache={})
    state = stage.prepare(sup)
    stage(carry, state)
    assert carry.prob.shape == query.shape[:2]
    # the same call by hand: hint = grey prior of both supports laid out like the query cell
    prior = stage.matcher.similarity(query, stage.matcher.prepare(sup), {})
    hint = canvas.to_model(canvas.resize_image(canvas.grey_image(prior), stage.cell))
    q = canvas.to_model(canvas.resize_image(query, stage.cell))
    imgs = canvas.to_model(state["images"].numpy())
    cols = canvas.to_model(canvas.encode_mask(state["masks"].numpy(), canvas.binary_palette()))
    ref = paint(stage.model, q, imgs, cols, hint=hint)
    assert torch.allclose(canvas.binary_score(ref, *canvas.binary_palette(), query.shape[:2]), carry.prob)
    assert not torch.allclose(ref, paint(stage.model, q, imgs, cols, hint=torch.zeros_like(hint)))
    with pytest.raises(InputError, match="one class at a time"):
        stage.segment_labels(query, sup)


def test_prior_task_sample_and_loss_cover_the_query_cell():
    from incontext.generate.painter_task import PainterTask
    from incontext.train.data import TrainItem, stack

    task = PainterTask(model={**TINY, "match_prior": PRIOR}, p_lower_half=1.0, p_random_colour=0.0,
                       p_crop=0.5, dice_weight=1.0)
    sup = _supports(2)
    s = [task.make_sample(TrainItem(sup[1].image, sup[1].mask, [sup[0]]), np.random.default_rng(i))
         for i in range(2)]
    assert s[0]["hint"].shape == s[0]["query"].shape and s[0]["bool_masked_pos"][16:].all()
    loss, logs = task.loss(task.build_model(), stack(s))
    assert torch.isfinite(loss) and 0.0 <= logs["dice"] <= 1.0
    dropped = PainterTask(model={**TINY, "match_prior": PRIOR}, p_lower_half=1.0, p_random_colour=0.0,
                          p_hint_drop=1.0).make_sample(TrainItem(sup[1].image, sup[1].mask, [sup[0]]),
                                                       np.random.default_rng(0))
    grey = canvas.denormalise(dropped["hint"])
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255), atol=1e-5)  # uniform grey: "no prior"
    with pytest.raises(ValueError, match="p_lower_half"):
        PainterTask(model={**TINY, "match_prior": PRIOR}, p_lower_half=0.5)
    with pytest.raises(ValueError, match="binary colours"):
        PainterTask(model=TINY, p_random_colour=1.0, dice_weight=1.0)


def test_conv_stem_model_saves_loads_and_paints(tmp_path):
    """``conv_stem`` swaps SegGPT's patch projection for a ``ConvStem``; the folder round-trips exactly and a
    stem that does not reach the patch size is refused by name."""
    torch.manual_seed(0)
    model = build_seggpt({**TINY, "conv_stem": [8, 8, 16]}).eval()
    assert isinstance(model.model.embeddings.patch_embeddings.projection, painter_mod.ConvStem)
    model.save_pretrained(str(tmp_path))
    loaded = load_seggpt(tmp_path)
    sup = _supports(1)
    q = canvas.to_model(canvas.resize_image(sup[0].image, (32, 32)))
    cols = canvas.to_model(canvas.encode_mask(canvas.resize_labels(sup[0].mask, (32, 32)), canvas.binary_palette()))
    a, b = paint(model, q, q[None], cols[None]), paint(loaded, q, q[None], cols[None])
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="conv_stem"):
        build_seggpt({**TINY, "conv_stem": [8, 8]})


def test_wrong_hint_comes_from_the_decoy_support():
    """``p_wrong_hint``: the hint is the prior of the decoy (another class), while the prompt pair and the target
    stay the episode's own; without decoys the task says what data it needs."""
    from incontext.generate.painter_task import PainterTask
    from incontext.train.data import TrainItem

    sup = _supports(2)
    decoy = Support.from_arrays(np.full((40, 52, 3), 30, np.uint8), np.pad(np.ones((4, 4), np.uint8), 18)[:40, :52])
    kw = dict(model={**TINY, "match_prior": PRIOR}, p_lower_half=1.0, p_random_colour=0.0, hflip=0.0)
    item = TrainItem(sup[1].image, sup[1].mask, [sup[0]], [decoy])
    right = PainterTask(**kw).make_sample(item, np.random.default_rng(0))
    wrong = PainterTask(**kw, p_wrong_hint=1.0).make_sample(item, np.random.default_rng(0))
    for key in ("query", "prompt", "prompt_mask", "label"):
        assert torch.equal(right[key], wrong[key])
    assert not torch.equal(right["hint"], wrong["hint"])
    with pytest.raises(ValueError, match="DecoyEpisodes"):
        PainterTask(**kw, p_wrong_hint=1.0).make_sample(TrainItem(sup[1].image, sup[1].mask, [sup[0]]),
                                                        np.random.default_rng(0))


def test_match_readout_loss_rewards_features_that_tell_the_class_apart():
    """The read-out is low when foreground tokens of both cells share a direction that background tokens don't,
    high when the features are swapped; the task logs it through a hook on the chosen block's image stream."""
    from incontext.generate.painter_task import PainterTask, match_readout_loss
    from incontext.train.data import TrainItem, stack

    patch, h = 8, 32
    mask = torch.zeros(1, h, h)
    mask[:, 8:24, 8:24] = 1.0  # a 2 x 2-token square in both cells
    colour = canvas.to_model((mask[0, :, :, None].expand(h, h, 3) * 255).to(torch.uint8))[None]
    fg_tok = torch.nn.functional.avg_pool2d(mask[None], patch)[0, 0] > 0.5  # (4, 4)
    tokens = torch.where(torch.cat([fg_tok, fg_tok])[None, :, :, None], torch.tensor([1.0, 0.0]),
                         torch.tensor([0.0, 1.0]))  # (1, 8, 4, 2)
    good = match_readout_loss(tokens, colour, colour, patch)
    bad = match_readout_loss(torch.cat([tokens[:, :4], tokens[:, 4:].flip(-1)], 1), colour, colour, patch)
    assert good < 1e-3 and bad > 5.0

    task = PainterTask(model=TINY, p_lower_half=1.0, p_random_colour=0.0, match_weight=1.0, match_layer=0)
    sup = _supports(2)
    s = [task.make_sample(TrainItem(sup[1].image, sup[1].mask, [sup[0]]), np.random.default_rng(i)) for i in range(2)]
    loss, logs = task.loss(task.build_model(), stack(s))
    assert torch.isfinite(loss) and logs["match"] > 0
    with pytest.raises(ValueError, match="binary colours"):
        PainterTask(model=TINY, match_weight=1.0)
