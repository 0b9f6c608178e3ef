"""DINOv2: parity with the Matcher fixture, equal outputs across incontext / hub / timm / transformers."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from incontext.backbones.dinov2 import DinoV2Arch, DinoV2ViT, build_dinov2, from_arch_json
from incontext.errors import InputError

TINY = dict(embed_dim=64, depth=2, num_heads=2, img_size=224, init_values=1.0)

# An independent, plain-torch DINOv2 written for this test (official semantics and key names: qkv attention
# computed explicitly, layer scale, pre-norm blocks, bicubic pos-embed interpolation with offset 0.1). It is
# served through a local torch.hub directory, so the test exercises `torch.hub.load(..., source="local")`.
HUBCONF = textwrap.dedent(
    '''
    import math
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    dependencies = ["torch"]


    class Mlp(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))


    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * self.gamma


    class Attn(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
            return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
            self.attn, self.mlp = Attn(d, heads), Mlp(d, 4 * d)
            self.ls1, self.ls2 = Scale(d), Scale(d)

        def forward(self, x):
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))


    class PatchEmbed(nn.Module):
        def __init__(self, d, p):
            super().__init__()
            self.proj = nn.Conv2d(3, d, p, p)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)


    class TinyDino(nn.Module):
        def __init__(self, d=64, depth=2, heads=2, img=224, p=14):
            super().__init__()
            self.p = p
            self.patch_embed = PatchEmbed(d, p)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // p) ** 2, d))
            self.mask_token = nn.Parameter(torch.zeros(1, d))
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
            self.norm = nn.LayerNorm(d, eps=1e-6)

        def prepare_tokens_with_masks(self, x):
            h, w = x.shape[-2] // self.p, x.shape[-1] // self.p
            x = self.patch_embed(x)
            x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), 1)
            m = int(math.sqrt(self.pos_embed.shape[1] - 1))
            pos = self.pos_embed
            if (h, w) != (m, m):
                g = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
                g = F.interpolate(g, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
                pos = torch.cat((pos[:, :1], g.permute(0, 2, 3, 1).reshape(1, h * w, -1)), 1)
            return x + pos

        def forward_features(self, x):
            x = self.prepare_tokens_with_masks(x)
            for blk in self.blocks:
                x = blk(x)
            n = self.norm(x)
            return {"x_prenorm": x, "x_norm_clstoken": n[:, 0], "x_norm_patchtokens": n[:, 1:]}


    def dinov2_tiny(*, pretrained=False, **kwargs):
        assert not pretrained, "the test hub entry has no published weights"
        return TinyDino(**kwargs)
    '''
)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Random tiny DINOv2 weights (official keys) with non-trivial norms/pos-embeddings, saved once."""
    torch.manual_seed(0)
    model = DinoV2ViT(DinoV2Arch(**TINY))
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "dinov2_tiny.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    (d / "hubconf.py").write_text(HUBCONF)
    return d


def _images(seed=0, n=2, hw=(224, 224)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *hw, 3), dtype=np.uint8)


def test_matcher_fixture_prenorm_tokens(parity_dir):
    case = parity_dir / "matcher" / "fss_1shot_duck"
    feats = from_arch_json(parity_dir / "matcher" / "weights" / "seed0" / "arch.json")
    inputs, expected = np.load(case / "00_inputs.npz"), np.load(case / "01_features.npz")
    out = feats.patch_tokens(feats.normalize(inputs["support_images"]))
    assert out["prenorm"].shape == (1, 37 * 37, 128)
    np.testing.assert_allclose(out["prenorm"].numpy(), expected["support_prenorm"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["cls"].numpy(), expected["support_cls_prenorm"], atol=1e-4, rtol=0)
    q = feats.patch_tokens(feats.normalize(inputs["query_image"][None]))
    np.testing.assert_allclose(q["prenorm"][0].numpy(), expected["query_prenorm"], atol=1e-4, rtol=0)
    # preprocess() of the original file reproduces Matcher's torchvision Resize((518, 518)) on the PIL image
    src = next((case / "inputs").glob("support_0.*"))
    original = np.asarray(Image.open(src).convert("RGB"))
    assert torch.equal(feats.preprocess([original], size=518), feats.normalize(inputs["support_images"]))


@pytest.mark.parametrize("source", ["hub", "timm", "transformers"])
def test_sources_agree_at_native_size(source, tiny_weights, hub_dir):
    kw = dict(arch=TINY, weights=tiny_weights)
    ref = build_dinov2("dinov2_tiny", source="incontext", **kw)
    extra = dict(hub_repo=hub_dir, hub_entry="dinov2_tiny") if source == "hub" else {}
    other = build_dinov2("dinov2_tiny", source=source, **kw, **extra)
    x = ref.normalize(_images())
    a, b = ref.patch_tokens(x), other.patch_tokens(x)
    for key in ("prenorm", "normed", "cls", "cls_normed"):
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-5)
    # the blocks mix tokens (no near-identity layer scale): prenorm differs from patch embedding + pos
    assert a["prenorm"].shape == (2, 256, 64) and a["prenorm"].std(dim=1).mean() > 0.1


def test_hub_agrees_off_native_size(tiny_weights, hub_dir):
    """Official pos-embed interpolation (bicubic, offset 0.1) at a non-square size."""
    ref = build_dinov2("dinov2_tiny", arch=TINY, weights=tiny_weights)
    hub = build_dinov2("dinov2_tiny", arch=TINY, weights=tiny_weights, source="hub", hub_repo=hub_dir,
                       hub_entry="dinov2_tiny")
    x = ref.preprocess(list(_images(n=1, hw=(100, 150))), size=(168, 252))
    a, b = ref.patch_tokens(x), hub.patch_tokens(x)
    assert a["prenorm"].shape == (1, 12 * 18, 64)
    torch.testing.assert_close(a["prenorm"], b["prenorm"], atol=2e-5, rtol=1e-5)


def test_intermediate_block_and_batching(tiny_weights):
    f = build_dinov2("dinov2_tiny", arch=TINY, weights=tiny_weights)
    x = f.normalize(_images(n=3))
    full = f.patch_tokens(x, block=0)
    chunked = f.patch_tokens(x, block=0, batch_size=2)
    torch.testing.assert_close(full["prenorm"], chunked["prenorm"])
    single = f.patch_tokens(x[1:2], block=0)
    torch.testing.assert_close(full["prenorm"][1:2], single["prenorm"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full["prenorm"], f.patch_tokens(x)["prenorm"])
    assert not full["prenorm"].requires_grad


def test_registers_follow_official_layout(tmp_path):
    arch = dict(TINY, num_register_tokens=4)
    torch.manual_seed(3)
    sd = DinoV2ViT(DinoV2Arch(**arch)).state_dict()
    assert sd["register_tokens"].shape == (1, 4, 64) and sd["pos_embed"].shape == (1, 257, 64)
    g = torch.Generator().manual_seed(4)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    path = tmp_path / "reg.pth"
    torch.save(sd, path)
    ref = build_dinov2("dinov2_tiny_reg", arch=arch, weights=path)
    tim = build_dinov2("dinov2_tiny_reg", arch=arch, weights=path, source="timm")
    x = ref.normalize(_images(n=1))
    a, b = ref.patch_tokens(x), tim.patch_tokens(x)
    assert a["prenorm"].shape == (1, 256, 64)
    torch.testing.assert_close(a["prenorm"], b["prenorm"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a["cls"], b["cls"], atol=2e-5, rtol=1e-5)


def test_random_init_is_seeded():
    a = build_dinov2("dinov2_tiny", arch=TINY, weights="random", seed=5)
    b = build_dinov2("dinov2_tiny", arch=TINY, weights="random", seed=5)
    x = a.normalize(_images(n=1))
    torch.testing.assert_close(a.patch_tokens(x)["prenorm"], b.patch_tokens(x)["prenorm"])
    assert a.name.startswith("dinov2_tiny@seed5-") and a.name != build_dinov2("dinov2_tiny", arch=dict(TINY, depth=1), weights="random", seed=5).name


def test_bad_inputs_raise_clear_errors(tiny_weights, tmp_path):
    f = build_dinov2("dinov2_tiny", arch=TINY, weights=tiny_weights)
    with pytest.raises(InputError, match="multiples of 14"):
        f.patch_tokens(torch.zeros(1, 3, 100, 100))
    t = build_dinov2("dinov2_tiny", arch=TINY, weights=tiny_weights, source="timm")
    with pytest.raises(InputError, match="source='incontext'"):
        t.patch_tokens(torch.zeros(1, 3, 140, 140))
    wrong = tmp_path / "wrong.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, wrong)
    with pytest.raises(InputError, match="does not match the model"):
        build_dinov2("dinov2_tiny", arch=TINY, weights=wrong)
    notsd = tmp_path / "list.pth"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(InputError, match="not a state dict"):
        build_dinov2("dinov2_tiny", arch=TINY, weights=notsd)
    with pytest.raises(InputError, match="unknown"):
        build_dinov2("dinov2_vitx14", weights="random")


def test_full_size_keys_match_official_layout():
    """Meta-device build: key names/shapes of ViT-L/14 and ViT-g/14 (fused SwiGLU) as in the official files."""
    with torch.device("meta"):
        sd_l = DinoV2ViT(DinoV2Arch(embed_dim=1024, depth=24, num_heads=16)).state_dict()
        sd_g = DinoV2ViT(DinoV2Arch(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused")).state_dict()
    assert sd_l["pos_embed"].shape == (1, 1370, 1024) and sd_l["mask_token"].shape == (1, 1024)
    assert len(sd_l) == 3 + 2 + 24 * 14 + 2  # cls/pos/mask, patch proj, 14 tensors per block, final norm
    # official ViT-g fused SwiGLU: mlp.w12 (8192, 1536) / mlp.w3 (1536, 4096)
    assert sd_g["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    assert sd_g["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    assert not any(".mlp.fc1." in k for k in sd_g)


def test_swiglu_round_trip_and_timm(tmp_path):
    arch = dict(TINY, ffn_layer="swiglufused")
    torch.manual_seed(0)
    sd = DinoV2ViT(DinoV2Arch(**arch)).state_dict()
    assert "blocks.0.mlp.w12.weight" in sd
    path = tmp_path / "g.safetensors"
    save_file(sd, str(path))
    ref = build_dinov2("dinov2_tiny_g", arch=arch, weights=path)
    tim = build_dinov2("dinov2_tiny_g", arch=arch, weights=path, source="timm")
    x = ref.normalize(_images(n=1))
    torch.testing.assert_close(ref.patch_tokens(x)["normed"], tim.patch_tokens(x)["normed"], atol=2e-5, rtol=1e-5)


def test_register_entry_points_use_hub_interpolation():
    """dinov2/hub/backbones.py: *_reg models use 4 registers, antialiased interpolation and offset 0."""
    from incontext.backbones.dinov2 import _resolve_arch

    reg, _, regs = _resolve_arch("dinov2_vitl14_reg", None)
    plain, _, _ = _resolve_arch("dinov2_vitl14", None)
    assert regs == 4 and reg.num_register_tokens == 4
    assert (reg.interpolate_antialias, reg.interpolate_offset) == (True, 0.0)
    assert (plain.interpolate_antialias, plain.interpolate_offset) == (False, 0.1)
