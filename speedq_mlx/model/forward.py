"""Batched forward of an mlx-vlm InternVL model for training and evaluation.

mlx-vlm's own `Model.__call__` merges image features for batch size 1 only (it takes
pixel_values[0] and column indices of the image tokens); training needs batches. This
reuses the model's own modules (vision tower, pixel shuffle, mlp1, language model)
and only does the merge itself: image features fill the <IMG_CONTEXT> positions of the
flattened batch in order.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def image_features(model, pixel_values: mx.array, channels_last: bool = False) -> mx.array:
    """[n_tiles, tokens_per_tile, hidden] projected features of tiles [N, 3, S, S] (or
    [N, S, S, 3] with channels_last): what the language model sees."""
    from mlx_vlm.models.base import pixel_shuffle

    x = pixel_values if channels_last else pixel_values.transpose(0, 2, 3, 1)
    x = x.astype(model.vision_model.embeddings.patch_embedding.weight.dtype)
    h, _, _ = model.vision_model(x, output_hidden_states=True)
    h = pixel_shuffle(h[:, 1:, :], shuffle_ratio=model.downsample_ratio)
    for layer in model.mlp1:
        h = layer(h)
    return h


def input_embeddings(model, input_ids: mx.array, pixel_values: mx.array | None,
                     image_token_index: int) -> mx.array:
    embed = model.language_model.model.embed_tokens(input_ids)
    if pixel_values is None:
        return embed
    feats = image_features(model, pixel_values)
    B, L, D = embed.shape
    positions = np.flatnonzero(np.array(input_ids).reshape(-1) == image_token_index)
    feats = feats.reshape(-1, feats.shape[-1]).astype(embed.dtype)
    if positions.size != feats.shape[0]:
        raise ValueError(f"{positions.size} image tokens but {feats.shape[0]} image features")
    flat = embed.reshape(B * L, D)
    flat[mx.array(positions)] = feats
    return flat.reshape(B, L, D)


def logits(model, input_ids: mx.array, pixel_values: mx.array | None = None,
           image_token_index: int | None = None) -> mx.array:
    """[B, L, vocab] logits of a (right-padded) batch; padding only follows real tokens,
    so the causal mask keeps it out of every real position."""
    if image_token_index is None:
        image_token_index = model.config.image_token_index
    emb = input_embeddings(model, input_ids, pixel_values, image_token_index)
    return model.language_model(None, inputs_embeds=emb).logits


def row_logits(model, input_ids: mx.array, pixel_values: mx.array | None, image_token_index: int,
               rows: tuple) -> mx.array:
    """[N, vocab] logits at the (batch, position) pairs `rows` only: the language model's
    head - a 151k-row matrix on InternVL2 - runs on the scored positions, not on every image
    token (a 2048-token photo conversation has ~100 answer tokens)."""
    emb = input_embeddings(model, input_ids, pixel_values, image_token_index)
    lm = model.language_model
    h = lm.model(None, inputs_embeds=emb)[rows[0], rows[1]]
    return lm.model.embed_tokens.as_linear(h) if lm.args.tie_word_embeddings else lm.lm_head(h)
