"""SAM's mask decoder for many prompt sets on one image, with the image-only work of its first block done once.

``segment_anything``'s ``MaskDecoder.predict_masks`` copies the image embedding (and its positional encoding)
once per prompt set and runs every projection of the two-way transformer on each copy. Without a mask prompt the
dense prompt embedding is the same learned vector for every set, so in the first two-way block the image tokens,
``keys + key_pe``, and three of their four projections (token-to-image keys and values, image-to-token queries)
are identical for all sets. :func:`decode_masks` computes those once and feeds them to the unchanged operation
sequence; everything that depends on the prompts runs exactly as in ``segment_anything`` (same modules, same
operation order, same tensor layouts), so the outputs are bit-identical to ``MaskDecoder.forward`` (checked in
tests/refine/test_sam_prompts.py and by the Matcher parity fixtures). Linear layers give each row the same
result whatever the number of rows, which is what makes computing a shared row once exact. The output upscaling
runs one set at a time (same bits, better cache use).
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayTransformer

__all__ = ["decode_masks", "supports_sharing"]


def supports_sharing(decoder) -> bool:
    """True for ``segment_anything``'s own decoder classes (the only layout :func:`decode_masks` knows)."""
    return type(decoder) is MaskDecoder and type(decoder.transformer) is TwoWayTransformer


def _attention(
    attn: Attention,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    q_proj: torch.Tensor | None = None,
    k_proj: torch.Tensor | None = None,
    v_proj: torch.Tensor | None = None,
) -> torch.Tensor:
    """``segment_anything`` ``Attention.forward`` with optionally precomputed (B, n, C') projections."""
    q = attn.q_proj(q) if q_proj is None else q_proj
    k = attn.k_proj(k) if k_proj is None else k_proj
    v = attn.v_proj(v) if v_proj is None else v_proj
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    _, _, _, c_per_head = q.shape
    a = q @ k.permute(0, 1, 3, 2)
    a = a / math.sqrt(c_per_head)
    a = torch.softmax(a, dim=-1)
    out = attn._recombine_heads(a @ v)
    return attn.out_proj(out)


def _shared(x: torch.Tensor, b: int) -> torch.Tensor:
    """(1, n, C) -> (b, n, C) contiguous: the layout the per-set computation would have produced."""
    return x.expand(b, -1, -1).contiguous()


def decode_masks(
    decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for B prompt sets on one image, sharing the first block's image-only work.

    Args:
        decoder: a ``segment_anything`` ``MaskDecoder`` (see :func:`supports_sharing`).
        image_embedding: (1, C, h, w) image embedding.
        image_pe: (1, C, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse: (B, T, C) sparse prompt embeddings.
        dense: (B, C, h, w) dense prompt embeddings; must be the same for every set (no mask prompts).
        multimask_output: the three multimask outputs, else the single-mask output.

    Returns:
        low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M), as ``MaskDecoder.forward``.
    """
    b = sparse.shape[0]
    t = decoder.transformer
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)

    src = image_embedding + dense[:1]  # (1, C, h, w): equal to every row of the per-set copy
    _, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    query_pe = tokens

    # first two-way block: the image side is the same for every set until the image-to-token update
    layer = t.layers[0]
    queries = tokens
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    ca = layer.cross_attn_token_to_image
    attn_out = _attention(ca, q, None, None, k_proj=_shared(ca.k_proj(k), b), v_proj=_shared(ca.v_proj(keys), b))
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    ia = layer.cross_attn_image_to_token
    attn_out = _attention(ia, None, q, queries, q_proj=_shared(ia.q_proj(k), b))
    keys = layer.norm4(keys + attn_out)

    for layer in t.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
    q = queries + query_pe
    k = keys + key_pe
    attn_out = t.final_attn_token_to_image(q=q, k=k, v=keys)
    hs = t.norm_final_attn(queries + attn_out)

    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    src = keys.transpose(1, 2).view(b, c, h, w)
    # One set at a time: the upscaling's (4x larger) activations stay in cache; per-sample convolutions and
    # channel-wise LayerNorm give the same bits as the batched call.
    upscaled = torch.cat([decoder.output_upscaling(src[i : i + 1]) for i in range(b)])
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]
