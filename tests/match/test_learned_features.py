"""The patch encoder trained here: both feature interfaces, its folder format and its training objective."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from incontext.episode import Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.features.learned import (
    LearnedFeatures,
    LearnedPatchFeatures,
    PatchEncoder,
    PatchEncoderConfig,
    load_patch_encoder,
)
from incontext.features.learned_task import PatchEncoderTask
from incontext.train.data import TrainItem

TINY = dict(grid=8, stem=(8, 8), width=16, dilations=(1, 2), dim=8)


def _model(seed: int = 0) -> PatchEncoder:
    torch.manual_seed(seed)
    return PatchEncoder(PatchEncoderConfig(**TINY)).eval()


def test_dense_and_matcher_interfaces_agree():
    m = _model()
    imgs = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    dense = LearnedFeatures(m)(imgs[1])
    assert dense.shape == (8, 8, 8)
    torch.testing.assert_close(dense.norm(dim=0), torch.ones(8, 8))
    pf = LearnedPatchFeatures(m, work_size=112, patch_size=14)  # 112 / 14 = the encoder's 8 x 8 grid
    tok = pf.patch_tokens(pf.normalize(imgs))["prenorm"]
    assert tok.shape == (2, 64, 8) and pf.embed_dim == 8
    # token i = cell (i // 8, i % 8); unit-normalised it is the dense extractor's feature of that cell
    torch.testing.assert_close(F.normalize(tok[1], dim=1)[3 * 8 + 5], dense[:, 3, 5], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="grid"):
        LearnedPatchFeatures(m, work_size=518, patch_size=14)
    with pytest.raises(InputError, match="uint8"):
        pf.normalize(imgs.astype(np.float32))


def test_folder_roundtrip_and_errors(tmp_path):
    m = _model(1)
    m.save_pretrained(tmp_path / "enc")
    back = load_patch_encoder(tmp_path / "enc")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(back(x), m(x))
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        load_patch_encoder(tmp_path / "missing")
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(InputError, match="not a patch-encoder config"):
        load_patch_encoder(tmp_path / "enc")


def _item(rng: np.random.Generator, colour: tuple[int, int, int]) -> TrainItem:
    """A target square of ``colour`` and a grey distractor square on noise, in query and support."""

    def scene() -> tuple[np.ndarray, np.ndarray]:
        img = rng.integers(90, 130, (32, 32, 3)).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        y, x = rng.integers(0, 16, 2)
        img[y : y + 12, x : x + 12] = (128, 128, 128)
        y, x = rng.integers(0, 16, 2)
        img[y : y + 12, x : x + 12], mask[y : y + 12, x : x + 12] = colour, 1
        return img, mask

    q, qm = scene()
    return TrainItem(q, qm, [Support.from_arrays(*scene())])


def test_task_sample_labels_and_the_objective_learns():
    task = PatchEncoderTask(model=TINY, hflip=0.0, colour_jitter=0.0)
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]
    samples = [task.make_sample(_item(rng, colours[i % 4]), rng) for i in range(8)]
    s = samples[0]
    assert s["query"].shape == (3, 32, 32) and s["query_cells"].shape == (8, 8)
    assert set(torch.unique(s["query_cells"]).tolist()) <= {-1.0, 0.0, 1.0} and (s["query_cells"] == 1).any()
    batch = {k: torch.stack([x[k] for x in samples]) for k in samples[0]}
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(40):
        loss, logs = task.loss(model, batch)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, logs = task.loss(model, batch)
    assert float(loss.detach()) < 0.5 * first and logs["cell_acc"] > 0.9
