"""Known-weights table, local lookup, the status command and the missing/wrong-weights messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from incontext.backbones import weights as W
from incontext.backbones.dinov2 import build_dinov2
from incontext.backbones.sam import build_sam
from incontext.errors import InputError, WeightsNotFoundError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty torch hub dir, home and working directory; the project root points at tmp too."""
    hub = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(W, "_project_root", lambda: tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_table_has_official_names_and_urls():
    assert W.KNOWN_WEIGHTS["dinov2_vitl14"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    )
    assert W.KNOWN_WEIGHTS["dinov2_vitg14_reg"].filename == "dinov2_vitg14_reg4_pretrain.pth"
    assert W.KNOWN_WEIGHTS["sam_vit_h"].filename == "sam_vit_h_4b8939.pth"
    assert W.KNOWN_WEIGHTS["sam_vit_b"].url.endswith("/segment_anything/sam_vit_b_01ec64.pth")
    assert W.KNOWN_WEIGHTS["seggpt_vit_large"].hf_repo == "BAAI/seggpt-vit-large"
    assert W.known("vit_l").name == "sam_vit_l"
    with pytest.raises(InputError, match="known:"):
        W.known("dinov2_tiny")


def test_missing_weight_message_names_file_places_url_and_key(isolated):
    with pytest.raises(WeightsNotFoundError) as err:
        W.resolve("sam_vit_h", config_key="refine.sam.weights")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("sam_vit_h_4b8939.pth", str(isolated / "torch_hub" / "checkpoints"), "project/weights",
                 "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth", "refine.sam.weights="):
        assert part in msg


def test_lookup_order_and_explicit_paths(isolated):
    ckpt = isolated / "torch_hub" / "checkpoints"
    proj = isolated / "project" / "weights"
    for d in (ckpt, proj):
        d.mkdir(parents=True)
        (d / "dinov2_vits14_pretrain.pth").write_bytes(b"x")
    assert W.resolve("dinov2_vits14") == ckpt / "dinov2_vits14_pretrain.pth"  # hub cache before project dir
    (ckpt / "dinov2_vits14_pretrain.pth").unlink()
    assert W.resolve("dinov2_vits14") == proj / "dinov2_vits14_pretrain.pth"
    other = isolated / "elsewhere"
    other.mkdir()
    (other / "dinov2_vits14_pretrain.pth").write_bytes(b"y")
    assert W.resolve("dinov2_vits14", other) == other / "dinov2_vits14_pretrain.pth"  # a folder works
    assert W.resolve("dinov2_vits14", other / "dinov2_vits14_pretrain.pth").parent == other
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):  # a wrong explicit path is never replaced
        W.resolve("dinov2_vits14", isolated / "nope.pth")


def test_size_mismatch_warns(isolated):
    d = isolated / "home" / ".cache" / "incontext" / "weights"
    d.mkdir(parents=True)
    (d / "sam_vit_b_01ec64.pth").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="incomplete download"):
        assert W.resolve("sam_vit_b").parent == d
    line = next(x for x in W.status_lines() if x.startswith("sam_vit_b"))
    assert "found" in line and "possibly incomplete" in line


def test_hf_folder_for_seggpt(isolated):
    d = isolated / "project" / "weights" / "seggpt-vit-large"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="BAAI/seggpt-vit-large"):
        W.resolve("seggpt_vit_large")
    (d / "model.safetensors").write_bytes(b"")
    assert W.resolve("seggpt_vit_large") == d


def test_status_command_exits_zero_and_lists_every_weight(isolated, capsys):
    import runpy

    d = isolated / "torch_hub" / "checkpoints"
    d.mkdir(parents=True)
    (d / "dinov2_vitb14_pretrain.pth").write_bytes(b"0" * 10)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("incontext.weights", run_name="__main__")  # what `python -m incontext.weights` runs
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [ln.split()[0] for ln in lines]
    assert names[: len(W.KNOWN_WEIGHTS)] == list(W.KNOWN_WEIGHTS)
    found = dict((ln.split()[0], ln) for ln in lines)
    assert "found" in found["dinov2_vitb14"] and str(d / "dinov2_vitb14_pretrain.pth") in found["dinov2_vitb14"]
    assert "MISSING" in found["sam_vit_h"] and "wget -P" in found["sam_vit_h"]
    assert "MISSING" in found["seggpt_vit_large"] and "BAAI/seggpt-vit-large" in found["seggpt_vit_large"]
    assert lines[-1].startswith("dinov2 hub code")


def test_builders_report_missing_and_wrong_files(isolated):
    with pytest.raises(WeightsNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        build_dinov2("dinov2_vitl14")
    with pytest.raises(WeightsNotFoundError, match="sam.weights="):
        build_sam("sam_vit_b", weights_key="sam.weights")
    with pytest.raises(InputError, match="known:"):
        build_dinov2("dinov2_tiny", arch=dict(embed_dim=64, depth=1, num_heads=2))  # no weights for custom sizes
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):
        build_dinov2("dinov2_tiny", arch=dict(embed_dim=64, depth=1, num_heads=2), weights=isolated / "missing.pth")
    # a SAM checkpoint where DINOv2 weights are expected: keys are checked before the model is built
    d = isolated / "torch_hub" / "checkpoints"
    d.mkdir(parents=True)
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, d / "dinov2_vitg14_pretrain.pth")
    with pytest.raises(InputError, match="does not match the model"):
        build_dinov2("dinov2_vitg14")


def test_hub_source_offline_without_local_code(isolated):
    arch = dict(embed_dim=32, depth=1, num_heads=2, img_size=56)
    with pytest.raises(WeightsNotFoundError, match="hubconf.py.*git clone https://github.com/facebookresearch/dinov2"):
        build_dinov2("dinov2_tiny", arch=arch, weights="random", source="hub")
    assert build_dinov2("dinov2_tiny", arch=arch, weights="random", source="auto").backend == "incontext"
