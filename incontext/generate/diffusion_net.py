"""Networks of the diffusion mask generator: image encoder, support encoding, matching prior, denoisers.

Frames. Images (query and supports) are resized to ``image_size`` x ``image_size`` (the *model frame*); the
encoder turns them into a token grid of stride ``patch`` ((h, w) = image_size / patch). The query mask is
denoised in the model frame; the tiny denoiser works on the token grid by space-to-depth (``pixel_unshuffle``),
so one token carries a ``patch`` x ``patch`` block of the mask (reference note diffusion_retrieval.md, 5.1).

Conditioning (the published pattern, reference note 1.8):

* aligned with the mask -> **concatenated on channels**: the query's tokens, the three-channel training-free
  matching prior (cosine of each query token to the supports' foreground prototype, to its nearest foreground
  token and to its nearest background token: PANet / Matcher / PerSAM signals), the noisy mask and the
  self-conditioning estimate;
* not aligned -> **attention**: support tokens plus a learned foreground / background embedding weighted by the
  mask's coverage of each token; k shots = k x (h w) tokens; a learned null token is always present (the CFG
  "no support" condition and an attention sink). Tiny denoiser: keys / values = [query tokens; support tokens]
  (DiffewS-style KV fusion), the support half projected once per prepared context (``support_kv``). UNet
  denoiser: diffusers' ``UNet2DConditionModel`` cross-attention with ``encoder_attention_mask``
  (Ref-LDM-Seg-style).

Weights are saved in the Hugging Face layout: ``config.json`` (``DiffusionConfig``) + ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from incontext.errors import InputError

__all__ = ["DiffusionConfig", "DiffusionSegModel", "ConvEncoder", "TinyDenoiser", "UNetDenoiser",
           "SupportCode", "matching_prior", "MODEL_TYPE"]

MODEL_TYPE = "incontext-diffusion-mask"
PRIOR_CHANNELS = 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DiffusionConfig:
    """Architecture of ``DiffusionSegModel`` (written to ``config.json``).

    Attributes:
        image_size: side of the model frame (query and supports are resized to it; the mask is predicted at it).
        patch: token stride (4 or 8); the token grid is image_size / patch.
        encoder_widths: conv encoder widths at strides 2, 4, ..., patch, and one context stage at 2 x patch.
        encoder_blocks: residual blocks per encoder stage (same length as ``encoder_widths``).
        feature_dim: token feature size (what the matching prior compares).
        width: denoiser width C (support tokens are projected to it).
        blocks: denoiser blocks (residual conv + FiLM(t), then attention).
        heads: attention heads.
        support_pool: support tokens entering attention are average-pooled over support_pool x support_pool
            cells (attention cost / support_pool^2; the matching prior still compares every token).
        time_dim: sinusoidal embedding size of t.
        denoiser: "tiny" (token-grid conv + KV-fusion attention) or "unet" (diffusers UNet2DConditionModel).
        unet: ``UNet2DConditionModel`` keyword arguments for denoiser="unet" (in/out channels and
            cross_attention_dim are set by this model); None with ``unet_folder`` = take the folder's config.
        unet_folder: local folder of a pretrained ``UNet2DConditionModel`` (diffusers layout) to start from;
            only read at build time, never saved (the saved config carries the UNet's config instead).
        match_prior: settings of the training-free ``PrototypeMatch`` stage (handcrafted features) whose
            foreground probability enters as one more query-aligned channel (``size``, ``stride``,
            ``bg_prototypes``, ``temperature``, ``fg_threshold``); None = no such channel. Kept in the model
            config because the model was trained with exactly this matcher.
    """

    image_size: int = 64
    patch: int = 4
    encoder_widths: list[int] = field(default_factory=lambda: [32, 64, 96])
    encoder_blocks: list[int] = field(default_factory=lambda: [1, 2, 2])
    feature_dim: int = 64
    width: int = 64
    blocks: int = 2
    heads: int = 4
    support_pool: int = 1
    time_dim: int = 64
    denoiser: str = "tiny"
    unet: dict | None = None
    unet_folder: str | None = None
    match_prior: dict | None = None
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        levels = int(round(math.log2(self.patch))) if self.patch > 0 else -1
        if self.patch not in (2, 4, 8, 16):
            raise InputError(f"model.patch: {self.patch!r}; pass 2, 4, 8 or 16 (the token stride)")
        if len(self.encoder_widths) != levels + 1 or len(self.encoder_blocks) != levels + 1:
            raise InputError(
                f"model.encoder_widths / encoder_blocks: {list(self.encoder_widths)} / "
                f"{list(self.encoder_blocks)} need log2(patch) + 1 = {levels + 1} entries each "
                "(strides 2 .. patch plus one context stage)"
            )
        if self.image_size % (2 * self.patch):
            raise InputError(f"model.image_size: {self.image_size} must be a multiple of 2 x patch "
                             f"= {2 * self.patch}")
        if self.denoiser not in ("tiny", "unet"):
            raise InputError(f"model.denoiser: {self.denoiser!r}; pass 'tiny' or 'unet'")
        if self.support_pool < 1 or self.grid % self.support_pool:
            raise InputError(f"model.support_pool: {self.support_pool!r} must be >= 1 and divide the token "
                             f"grid {self.grid}")
        if self.width % self.heads:
            raise InputError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        self.encoder_widths = [int(w) for w in self.encoder_widths]
        self.encoder_blocks = [int(b) for b in self.encoder_blocks]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def cond_channels(self) -> int:
        """Query-aligned conditioning channels: token features, [match-stage prior], matching prior."""
        return self.feature_dim + (1 if self.match_prior is not None else 0) + PRIOR_CHANNELS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------ blocks
def _groups(c: int) -> int:
    return math.gcd(8, c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a skip; optional FiLM (scale, shift) from an embedding."""

    def __init__(self, c: int, emb_dim: int | None = None) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, c, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c) if emb_dim else None
        nn.init.zeros_(self.c2.weight)  # start as identity: deep stacks train stably from step 0
        nn.init.zeros_(self.c2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        h = self.n2(h)
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return x + self.c2(F.silu(h))


class ConvEncoder(nn.Module):
    """RGB image -> token grid, trained jointly with the denoiser (the offline stand-in for frozen DINOv2
    patch tokens).

    Strided 3x3 stages down to stride ``patch`` plus one context stage at 2 x patch that is upsampled and
    added back (receptive field ~ object size, so shape as well as texture reaches each token).

    Input (B, 3, S, S) float in [0, 1]; output (B, feature_dim, S / patch, S / patch).
    """

    def __init__(self, widths: list[int], blocks: list[int], out_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        stages = []
        c_in = 3
        for w, n in zip(widths, blocks):
            stages.append(nn.Sequential(nn.Conv2d(c_in, w, 3, stride=2, padding=1),
                                        *[ResBlock(w) for _ in range(n)]))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.context = nn.Conv2d(widths[-1], widths[-2], 1)
        self.out = nn.Sequential(nn.GroupNorm(_groups(widths[-2]), widths[-2]), nn.SiLU(),
                                 nn.Conv2d(widths[-2], out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        for stage in self.stages[:-1]:
            x = stage(x)
        ctx = self.stages[-1](x)
        x = x + F.interpolate(self.context(ctx), size=x.shape[-2:], mode="nearest")
        return self.out(x)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous t in [0, 1] (scaled by 1000, DDPM's frequencies): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FusedAttention(nn.Module):
    """Pre-norm multi-head attention of the query tokens over [query tokens; support tokens] (KV fusion).

    The support half of the keys / values depends only on the prepared supports: ``support_kv`` computes it
    once, and ``forward`` reuses it for every step, sample and query.
    """

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(c)
        self.norm_s = nn.LayerNorm(c)
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.kv_s = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C / heads)
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def support_kv(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C) support tokens -> (B, 2, heads, L, C / heads) keys and values."""
        k, v = self.kv_s(self.norm_s(tokens)).chunk(2, dim=-1)
        return torch.stack([self._split(k), self._split(v)], dim=1)

    def forward(self, x: torch.Tensor, skv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) query tokens; skv: ``support_kv`` output; valid: (B, L) bool support keys to use."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        n = self.norm_q(t)
        q = self._split(self.q(n))
        k, v = self.kv(n).chunk(2, dim=-1)
        k = torch.cat([self._split(k), skv[:, 0]], dim=2)
        v = torch.cat([self._split(v), skv[:, 1]], dim=2)
        mask = torch.cat([torch.ones(b, h * w, dtype=torch.bool, device=x.device), valid], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------ supports
@dataclass
class SupportCode:
    """Everything the denoiser needs from the supports, computed once per prepared context.

    Attributes:
        tokens: (B, 1 + K h' w', C) support tokens ((h', w') = token grid / support_pool); index 0 is the
            learned null token.
        valid: (B, 1 + K h' w') bool, keys the attention may use (padding shots and, for the unconditional
            CFG branch, every real token are False; the null token is always True).
        proto: (B, F) L2-normalised foreground prototype (coverage-weighted mean over shots).
        bank: (B, K h w, F) L2-normalised support token features.
        fg: (B, K h w) bool, foreground tokens (coverage >= 0.5, else the best-covered ones of the shot).
        bg: (B, K h w) bool, background tokens (coverage < 0.05).
        kv: per-block support keys / values of the tiny denoiser ((B, 2, heads, L, d) each), or None.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    proto: torch.Tensor
    bank: torch.Tensor
    fg: torch.Tensor
    bg: torch.Tensor
    kv: list[torch.Tensor] | None = None

    def to_state(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a ``Context`` (batch dim dropped; B must be 1)."""
        out = {"tokens": self.tokens[0], "valid": self.valid[0], "proto": self.proto[0],
               "bank": self.bank[0], "fg": self.fg[0], "bg": self.bg[0]}
        for i, kv in enumerate(self.kv or []):
            out[f"kv{i}"] = kv[0]
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SupportCode":
        kv = [state[f"kv{i}"][None] for i in range(len(state)) if f"kv{i}" in state]
        return cls(state["tokens"][None], state["valid"][None].bool(), state["proto"][None],
                   state["bank"][None], state["fg"][None].bool(), state["bg"][None].bool(), kv or None)

    def expand(self, n: int) -> "SupportCode":
        """The same supports for a batch of ``n`` (samples of one query)."""
        e = lambda x: x.expand(n, *x.shape[1:])  # noqa: E731
        return SupportCode(e(self.tokens), e(self.valid), e(self.proto), e(self.bank), e(self.fg), e(self.bg),
                           [e(kv) for kv in self.kv] if self.kv is not None else None)

    def unconditional(self) -> "SupportCode":
        """The CFG null condition: only the null token is visible (the prior is zeroed by the model)."""
        valid = torch.zeros_like(self.valid)
        valid[:, 0] = True
        return SupportCode(self.tokens, valid, self.proto, self.bank, self.fg, self.bg, self.kv)


def matching_prior(qfeat: torch.Tensor, sup: SupportCode) -> torch.Tensor:
    """The training-free matching prior on the token grid (no parameters of its own).

    Args:
        qfeat: (B, F, h, w) query token features.
        sup: the supports' code.

    Returns:
        (B, 3, h, w): cosine of each query token to the foreground prototype, max cosine to any foreground
        support token, max cosine to any background support token (-1 where a support has none).
    """
    b, f, h, w = qfeat.shape
    q = F.normalize(qfeat.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, F)
    proto = torch.einsum("bnf,bf->bn", q, sup.proto)
    sims = torch.einsum("bnf,bmf->bnm", q, sup.bank)
    fg = sims.masked_fill(~sup.fg[:, None, :], -1.0).amax(-1)
    bg = sims.masked_fill(~sup.bg[:, None, :], -1.0).amax(-1)
    return torch.stack([proto, fg, bg], dim=1).view(b, PRIOR_CHANNELS, h, w)


# ------------------------------------------------------------------------------------------ denoisers
class TinyDenoiser(nn.Module):
    """x0-predicting denoiser on the token grid (~0.1-0.5 M parameters).

    Input channels = space-to-depth(noisy mask) + space-to-depth(self-conditioning x0 estimate) + query token
    features + matching prior; ``blocks`` x [ResBlock with FiLM(t) -> FusedAttention]; output =
    depth-to-space of ``patch``^2 logit channels -> (B, 1, S, S) x0 logits in the model frame.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        p2 = cfg.patch ** 2
        c = cfg.width
        self.patch = cfg.patch
        self.time = nn.Sequential(nn.Linear(cfg.time_dim, 2 * cfg.time_dim), nn.SiLU(),
                                  nn.Linear(2 * cfg.time_dim, 2 * cfg.time_dim))
        self.time_dim = cfg.time_dim
        self.inp = nn.Conv2d(2 * p2 + cfg.cond_channels, c, 3, padding=1)
        self.res = nn.ModuleList([ResBlock(c, 2 * cfg.time_dim) for _ in range(cfg.blocks)])
        self.attn = nn.ModuleList([FusedAttention(c, cfg.heads) for _ in range(cfg.blocks)])
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, p2, 3, padding=1))

    def support_kv(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [a.support_kv(tokens) for a in self.attn]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor, cond: torch.Tensor,
                sup: SupportCode) -> torch.Tensor:
        p = self.patch
        x = torch.cat([F.pixel_unshuffle(x_t, p), F.pixel_unshuffle(self_cond, p), cond], dim=1)
        emb = self.time(timestep_embedding(t, self.time_dim))
        h = self.inp(x)
        kv = sup.kv if sup.kv is not None else self.support_kv(sup.tokens)
        for res, attn, skv in zip(self.res, self.attn, kv):
            h = attn(res(h, emb), skv, sup.valid)
        return F.pixel_shuffle(self.out(h), p)


class UNetDenoiser(nn.Module):
    """The large-model path: diffusers' ``UNet2DConditionModel`` as the x0 denoiser (Ref-LDM-Seg / DiffewS
    style conditioning) behind the same interface as ``TinyDenoiser``.

    The "latent" is the space-to-depth mask on the token grid (exact and free, no VAE); the UNet's input is
    [noisy mask, self-conditioning, query features, prior] on channels; support tokens enter through its
    cross-attention with ``encoder_attention_mask``. A pretrained UNet (e.g. a Stable Diffusion ``unet``
    folder) is loaded from a local folder; when its ``conv_in`` / ``conv_out`` channel counts differ, they are
    replaced (input weights copied for the first channels and zero for the new ones, as Ref-LDM-Seg extends
    conv_in; output re-initialised), and a linear layer maps support tokens to its cross-attention size.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        p2 = cfg.patch ** 2
        self.patch = cfg.patch
        in_ch = 2 * p2 + cfg.cond_channels
        if cfg.unet_folder:
            folder = Path(cfg.unet_folder).expanduser()
            if not (folder / "config.json").is_file():
                from incontext.errors import WeightsNotFoundError

                raise WeightsNotFoundError(
                    f"diffusion unet_folder: no config.json in {str(folder)!r}; point model.unet_folder at a "
                    "local diffusers UNet2DConditionModel folder (e.g. <stable-diffusion>/unet copied from a "
                    "machine with internet), or set model.unet to a config for a randomly initialised UNet"
                )
            unet = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
            _adapt_unet(unet, in_ch, p2)
        else:
            if cfg.unet is None:
                raise InputError("model.unet: denoiser='unet' needs model.unet (UNet2DConditionModel kwargs) "
                                 "or model.unet_folder (a local pretrained UNet folder)")
            kwargs = dict(cfg.unet)
            kwargs.update(in_channels=in_ch, out_channels=p2)
            kwargs.setdefault("cross_attention_dim", cfg.width)
            try:
                unet = UNet2DConditionModel(**kwargs)
            except (TypeError, ValueError) as err:
                raise InputError(f"model.unet: {err}; see diffusers.UNet2DConditionModel") from None
        self.unet = unet
        cross = int(unet.config.cross_attention_dim)
        self.to_cross = nn.Identity() if cross == cfg.width else nn.Linear(cfg.width, cross)
        # What to save: the UNet's own config, so the checkpoint reloads without the source folder.
        cfg.unet = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        cfg.unet_folder = None

    def support_kv(self, tokens: torch.Tensor) -> None:  # the UNet projects K/V inside its attention
        return None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor, cond: torch.Tensor,
                sup: SupportCode) -> torch.Tensor:
        p = self.patch
        x = torch.cat([F.pixel_unshuffle(x_t, p), F.pixel_unshuffle(self_cond, p), cond], dim=1)
        out = self.unet(x, 1000.0 * t, encoder_hidden_states=self.to_cross(sup.tokens),
                        encoder_attention_mask=sup.valid.to(x.dtype)).sample
        return F.pixel_shuffle(out, p)


def _adapt_unet(unet: nn.Module, in_ch: int, out_ch: int) -> None:
    old = unet.conv_in
    if old.in_channels != in_ch:
        new = nn.Conv2d(in_ch, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            n = min(in_ch, old.in_channels)
            new.weight[:, :n] = old.weight[:, :n]
            new.bias.copy_(old.bias)
        unet.conv_in = new
        unet.register_to_config(in_channels=in_ch)
    old = unet.conv_out
    if old.out_channels != out_ch:
        unet.conv_out = nn.Conv2d(old.in_channels, out_ch, old.kernel_size, padding=old.padding)
        unet.register_to_config(out_channels=out_ch)


# ------------------------------------------------------------------------------------------ the model
class DiffusionSegModel(nn.Module):
    """Encoder + support encoding + matching prior + denoiser; predicts x0 logits of the query mask.

    Training calls ``forward`` (one call, so DDP sees every parameter); inference uses ``encode_images``,
    ``encode_supports`` (once per context), ``condition`` (once per query) and ``denoise`` (once per step).
    """

    def __init__(self, config: DiffusionConfig | dict) -> None:
        super().__init__()
        cfg = config if isinstance(config, DiffusionConfig) else DiffusionConfig.from_dict(dict(config))
        self.config = cfg
        self.encoder = ConvEncoder(cfg.encoder_widths, cfg.encoder_blocks, cfg.feature_dim)
        self.support_proj = nn.Linear(cfg.feature_dim, cfg.width)
        self.fg_embed = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.bg_embed = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.null_token = nn.Parameter(torch.randn(cfg.width) * 0.02)
        # Affine read-out of the matching prior (4 numbers), used only by the auxiliary prior loss in training:
        # it gives the encoder a direct metric-learning signal (PANet-style) from the first step.
        self.prior_head = nn.Conv2d(PRIOR_CHANNELS, 1, 1)
        with torch.no_grad():
            self.prior_head.weight.copy_(torch.tensor([0.0, 10.0, -10.0]).view(1, 3, 1, 1))
            self.prior_head.bias.zero_()
        self.denoiser = TinyDenoiser(cfg) if cfg.denoiser == "tiny" else UNetDenoiser(cfg)

    # ---------------------------------------------------------------- pieces
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1], model frame -> (B, F, h, w) token features."""
        return self.encoder(images)

    def encode_supports(self, feats: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None,
                        with_kv: bool = True) -> SupportCode:
        """Support tokens, prototype and token bank.

        Args:
            feats: (B, K, F, h, w) support token features.
            masks: (B, K, S, S) float in [0, 1], the support masks in the model frame.
            valid: (B, K) bool, real shots (False = padding); None = all real.
            with_kv: also project the tiny denoiser's per-block support keys / values (inference cache).
        """
        b, k, f, h, w = feats.shape
        if valid is None:
            valid = torch.ones(b, k, dtype=torch.bool, device=feats.device)
        m = masks.float().flatten(0, 1)[:, None]
        cover = F.adaptive_avg_pool2d(m, (h, w)).view(b, k, h * w) * valid[:, :, None]
        tok = feats.flatten(3).transpose(2, 3)  # (B, K, hw, F)
        ps = self.config.support_pool
        pooled = F.avg_pool2d(feats.flatten(0, 1), ps) if ps > 1 else feats.flatten(0, 1)
        pcover = F.adaptive_avg_pool2d(m, pooled.shape[-2:]).view(b, k, -1, 1)
        pt = pooled.flatten(2).transpose(1, 2).reshape(b, k, -1, f)
        x = self.support_proj(pt) + pcover * self.fg_embed + (1 - pcover) * self.bg_embed
        tokens = torch.cat([self.null_token.expand(b, 1, -1), x.flatten(1, 2)], dim=1)
        tok_valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=feats.device),
                               valid[:, :, None].expand(b, k, pt.shape[2]).flatten(1)], dim=1)
        bank = F.normalize(tok, dim=-1)
        proto = F.normalize((bank * cover[..., None]).sum(dim=(1, 2)), dim=-1)
        fg = cover >= 0.5
        best = cover.amax(dim=2, keepdim=True)  # thin objects may fill no token half: take the best-covered
        fg = fg | ((cover >= 0.5 * best) & (best > 0) & ~fg.any(dim=2, keepdim=True))
        bg = (cover < 0.05) & valid[:, :, None]
        code = SupportCode(tokens, tok_valid, proto, bank.flatten(1, 2), fg.flatten(1), bg.flatten(1))
        if with_kv:
            code.kv = self.denoiser.support_kv(tokens)
        return code

    def condition(self, qfeat: torch.Tensor, sup: SupportCode, drop: torch.Tensor | None = None,
                  match: torch.Tensor | None = None) -> torch.Tensor:
        """Query-aligned conditioning (B, ``cond_channels``, h, w): token features, the match stage's
        foreground probability ``match`` (B, 1, h, w) when the model uses one, and the matching prior; the
        support-dependent channels are zeroed where ``drop`` (B,) bool marks the unconditional CFG branch."""
        parts = [matching_prior(qfeat, sup)]
        if self.config.match_prior is not None:
            if match is None or tuple(match.shape[-2:]) != tuple(qfeat.shape[-2:]):
                raise InputError(
                    "diffusion: this model was trained with a match-stage prior (config.match_prior) and needs "
                    "it on the token grid; build it with DiffusionMethod (which adds the PrototypeMatch stage) "
                    "or pass a match stage that sets carry.prior"
                )
            parts.insert(0, match.to(qfeat.dtype))
        extra = torch.cat(parts, dim=1)
        if drop is not None:
            extra = extra * (~drop).to(extra.dtype)[:, None, None, None]
        return torch.cat([qfeat, extra], dim=1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor, cond: torch.Tensor,
                sup: SupportCode) -> torch.Tensor:
        """One x0 prediction: x_t, self_cond (B, 1, S, S) in signal units, t (B,) in [0, 1] -> (B, 1, S, S)
        x0 logits."""
        return self.denoiser(x_t, t, self_cond, cond, sup)

    # ---------------------------------------------------------------- training entry point
    def forward(self, query: torch.Tensor, supports: torch.Tensor, support_masks: torch.Tensor,
                shot_valid: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, drop: torch.Tensor,
                self_cond_mask: torch.Tensor, signal_scale: float = 1.0,
                match: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 logits of a training batch, and the prior read-out logits on the token grid.

        Args:
            query: (B, 3, S, S) float in [0, 1]; supports: (B, K, 3, S, S); support_masks: (B, K, S, S);
            shot_valid: (B, K) bool (shot 0 is always real); x_t: (B, 1, S, S) noisy mask; t: (B,);
            drop: (B,) bool, condition dropped (CFG training); self_cond_mask: (B,) bool, samples whose
            self-conditioning input comes from a first, gradient-free prediction (Analog Bits);
            match: (B, 1, h, w) match-stage prior on the token grid (models with ``match_prior``).

        Returns:
            (B, 1, S, S) x0 logits and (B, 1, h, w) ``prior_head`` logits (auxiliary loss).
        """
        b, k = shot_valid.shape
        real = shot_valid.flatten()
        imgs = torch.cat([query, supports.flatten(0, 1)[real]], dim=0)  # padding shots are never encoded
        feats = self.encode_images(imgs)
        qfeat = feats[:b]
        sfeat = feats.new_zeros(b * k, *feats.shape[1:])
        sfeat[real] = feats[b:]
        sup = self.encode_supports(sfeat.view(b, k, *feats.shape[1:]), support_masks, shot_valid, with_kv=False)
        valid = sup.valid.clone()
        valid[:, 1:] &= ~drop[:, None]
        sup.valid = valid
        cond = self.condition(qfeat, sup, drop, match)
        prior_logits = self.prior_head(cond[:, -PRIOR_CHANNELS:])
        sc = torch.zeros_like(x_t)
        if bool(self_cond_mask.any()):
            idx = self_cond_mask.nonzero().flatten()
            with torch.no_grad():
                sub = SupportCode(sup.tokens[idx], sup.valid[idx], sup.proto[idx], sup.bank[idx], sup.fg[idx],
                                  sup.bg[idx])
                first = self.denoise(x_t[idx], t[idx], sc[idx], cond[idx], sub)
            sc[idx] = (2 * torch.sigmoid(first) - 1) * signal_scale
        return self.denoise(x_t, t, sc, cond, sup), prior_logits

    # ---------------------------------------------------------------- Hugging Face layout
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (each file atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        tmp = directory / f".model.safetensors.{os.getpid()}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
        os.replace(tmp, directory / "model.safetensors")
        tmp = directory / f".config.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        os.replace(tmp, directory / "config.json")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DiffusionSegModel":
        """Load a folder written by ``save_pretrained`` (safetensors only, strict), in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        if cfg.get("model_type") != MODEL_TYPE:
            raise InputError(f"diffusion checkpoint {str(directory)!r}: config.json has model_type "
                             f"{cfg.get('model_type')!r}, expected {MODEL_TYPE!r}; is it another method's "
                             "checkpoint?")
        model = cls(cfg)
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        return model.eval().to(device)
