"""SAM's mask decoder for many prompt sets on one image, with the image-only work of its first block done once.

``segment_anything``'s ``MaskDecoder.predict_masks`` copies the image embedding (and its positional encoding)
once per prompt set and runs every projection of the two-way transformer on each copy. Without a mask prompt the
dense prompt embedding is the same learned vector for every set, so in the first two-way block the image tokens,
``keys + key_pe``, and three of their four projections (token-to-image keys and values, image-to-token queries)
are identical for all sets. :func:`decode_masks` computes those once and feeds them to the unchanged operation
sequence; everything that depends on the prompts runs exactly as in ``segment_anything`` (same modules, same
operation order, same tensor layouts), so the outputs are bit-identical to ``MaskDecoder.forward`` (checked in
tests/refine/test_sam_prompts.py and by the Matcher parity fixtures). Linear layers give each row the same
result whatever the number of rows, which is what makes computing a shared row once exact. With an
``image_cache`` that shared work is done once per image instead of once per call. Other exact savings: the
second block computes ``keys + key_pe`` once for both cross attentions (the released block adds it twice), the
positional encoding and the first block's keys are made row-major once so that the element-wise sums read
contiguous memory, and the output upscaling and hypernetwork product run one set at a time, writing straight into
the output (same bits, better cache use, no concatenation).
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


def _image_side(decoder, image_embedding, image_pe, dense, cache: dict | None) -> dict:
    """The prompt-independent tensors of the first two-way block, as ``segment_anything`` computes them.

    ``keys`` / ``keys + key_pe`` are taken in the channel-major layout ``predict_masks`` gives them (the projections
    then run through the same kernels as in the per-set computation); ``keys`` and ``key_pe`` are also kept
    row-major for the later element-wise sums, which do not depend on the layout.
    """
    if cache is not None and "keys" in cache:
        return cache
    t = decoder.transformer
    src = image_embedding + dense[:1]  # (1, C, h, w): equal to every row of the per-set copy
    _, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    k = keys + key_pe
    layer = t.layers[0]
    out = cache if cache is not None else {}
    out.update(
        chw=(c, h, w),
        k=layer.cross_attn_token_to_image.k_proj(k),
        v=layer.cross_attn_token_to_image.v_proj(keys),
        q=layer.cross_attn_image_to_token.q_proj(k),
        keys=keys.contiguous(),
        key_pe=key_pe.contiguous(),
    )
    return out


def _expanded(img: dict, name: str, b: int) -> torch.Tensor:
    """(1, n, C) -> (b, n, C) contiguous (the layout the per-set computation would have produced), kept per b."""
    key = (name, b)
    if key not in img:
        img[key] = img[name].expand(b, -1, -1).contiguous()
    return img[key]


def decode_masks(
    decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
    image_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for B prompt sets on one image, sharing the first block's image-only work.

    Args:
        decoder: a ``segment_anything`` ``MaskDecoder`` (see :func:`supports_sharing`).
        image_embedding: (1, C, h, w) image embedding.
        image_pe: (1, C, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse: (B, T, C) sparse prompt embeddings.
        dense: (B, C, h, w) dense prompt embeddings; must be the same for every set (no mask prompts).
        multimask_output: the three multimask outputs, else the single-mask output.
        image_cache: optional dict kept across calls for the *same* decoder, image embedding, positional
            encoding and (mask-free) dense embedding, e.g. all decoder calls of one image: the prompt-independent
            first-block projections are then computed once per image instead of once per call.

    Returns:
        low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M), as ``MaskDecoder.forward``.
    """
    b = sparse.shape[0]
    t = decoder.transformer
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)

    img = _image_side(decoder, image_embedding, image_pe, dense, image_cache)
    c, h, w = img["chw"]
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
    ca = layer.cross_attn_token_to_image
    attn_out = _attention(ca, q, None, None, k_proj=_expanded(img, "k", b), v_proj=_expanded(img, "v", b))
    queries = layer.norm2(queries + attn_out)
    queries = layer.norm3(queries + layer.mlp(queries))
    q = queries + query_pe
    ia = layer.cross_attn_image_to_token
    attn_out = _attention(ia, None, q, queries, q_proj=_expanded(img, "q", b))
    keys = layer.norm4(img["keys"] + attn_out)

    key_pe = img["key_pe"]
    for layer in t.layers[1:]:
        queries, keys = _block(layer, queries, keys, query_pe, key_pe)
    q = queries + query_pe
    k = keys + key_pe
    attn_out = t.final_attn_token_to_image(q=q, k=k, v=keys)
    hs = t.norm_final_attn(queries + attn_out)

    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    src = keys.transpose(1, 2).view(b, c, h, w)
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)],
        dim=1,
    )
    # One set at a time: the upscaling's (4x larger) activations stay in cache and each set's masks are
    # written straight into the output; per-sample convolutions, channel-wise LayerNorm and per-matrix products
    # give the same bits as the batched calls.
    masks = None
    for i in range(b):
        up = decoder.output_upscaling(src[i : i + 1])
        _, cu, hu, wu = up.shape
        if masks is None:
            masks = up.new_empty((b, hyper_in.shape[1], hu, wu))
        torch.matmul(hyper_in[i : i + 1], up.view(1, cu, hu * wu), out=masks[i : i + 1].view(1, -1, hu * wu))
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]


def _block(layer, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor):
    """``TwoWayAttentionBlock.forward`` with ``keys + key_pe`` computed once: it is the same sum for both cross
    attentions (``keys`` only changes at the end of the block)."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        attn_out = layer.self_attn(q=q, k=q, v=queries)
        queries = queries + attn_out
    queries = layer.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    attn_out = layer.cross_attn_token_to_image(q=q, k=k, v=keys)
    queries = queries + attn_out
    queries = layer.norm2(queries)
    mlp_out = layer.mlp(queries)
    queries = queries + mlp_out
    queries = layer.norm3(queries)
    q = queries + query_pe
    attn_out = layer.cross_attn_image_to_token(q=k, k=q, v=queries)
    keys = keys + attn_out
    keys = layer.norm4(keys)
    return queries, keys
