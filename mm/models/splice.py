"""Placing image features into a token sequence: shared by the IAA and LLaVA-style models.

The data pipeline expands every image placeholder into exactly as many positions as the image has feature
vectors and marks them in `image_mask` `[B, T]`. Features arrive per row in order of appearance,
`image_embeds` `[B, M, D]` (rows with fewer images are padded at the end). Position t of row b takes feature
number `cumsum(image_mask[b])[t] - 1`; everything else keeps its token embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def splice_image_features(text_embeds: Array, image_embeds: Array | None, image_mask: Array | None) -> Array:
    """`text_embeds` with the positions of `image_mask` replaced by `image_embeds` in order."""
    if image_embeds is None or image_mask is None:
        return text_embeds
    mask = image_mask.astype(bool)
    idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, idx[..., None], axis=1).astype(text_embeds.dtype)
    return jnp.where(mask[..., None], gathered, text_embeds)


def image_span_ids(image_mask: Array) -> Array:
    """1, 2, ... for each maximal run of image positions in a row, 0 elsewhere (for bidirectional attention)."""
    mask = image_mask.astype(jnp.int32)
    prev = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    starts = (mask == 1) & (prev == 0)
    return jnp.where(mask == 1, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def expand_placeholders(ids: list[int], placeholder: int, counts: list[int]) -> tuple[list[int], list[bool]]:
    """Replaces the k-th `placeholder` in `ids` by `counts[k]` image positions; returns ids and image mask.

    One placeholder per image (as users and the IAA release write prompts) becomes exactly as many positions
    as the image has feature vectors, so token counts are known before the model runs.
    """
    found = sum(1 for t in ids if t == placeholder)
    if found != len(counts):
        raise ValueError(f"{found} image placeholders ({placeholder}) in the prompt for {len(counts)} images")
    out: list[int] = []
    mask: list[bool] = []
    k = 0
    for t in ids:
        if t == placeholder:
            out += [placeholder] * counts[k]
            mask += [True] * counts[k]
            k += 1
        else:
            out.append(t)
            mask.append(False)
    return out, mask
