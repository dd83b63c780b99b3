"""A vision-language model = a ViT tower + an LLM-side model (IAA or LLaVA-style), as plain functions.

Params are one flat tree: `{"vision": <VisionTower params>, **<IAA or LLaVA params>}` (IAA: `base`, `mm`,
`g`; LLaVA: `llm`, `projector`), so parameter-group regexes see paths like `vision/encoder/layers_23/...`
and `mm/layers_3/...` directly. Images arrive as `pixel_values` `[B, N, C, H, W]` (N images or tiles per
row, rows with fewer padded at the end); their features are concatenated per row in order, and the LLM-side
model splices them at `image_mask` (`input_ids == image_token_id` unless given).
"""

from __future__ import annotations

from typing import Any

import jax

from mm.config import VLMConfig
from mm.models import iaa, llava, vision

Array = jax.Array


def lm_module(config: VLMConfig) -> Any:
    return iaa.IAA(config.lm) if config.is_iaa else llava.LLaVA(config.lm)


def encode_images(params: Any, config: VLMConfig, pixel_values: Array) -> Array:
    """`[B, N, C, H, W]` -> features `[B, N * tokens_per_image, vision width]` from the selected layer."""
    b, n = pixel_values.shape[:2]
    flat = pixel_values.reshape((b * n,) + pixel_values.shape[2:])
    feats = vision.image_features(params["vision"], config.vision, flat, config.feature_layer, config.feature)
    return feats.reshape(b, n * feats.shape[1], feats.shape[2])


def forward(params: Any, config: VLMConfig, input_ids: Array, *, pixel_values: Array | None = None,
            image_features: Array | None = None, image_mask: Array | None = None, workflow: str = "mm",
            positions: Array | None = None, segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
            cache: Any = None, cache_index: Array | None = None) -> tuple[Array, Any]:
    """Logits `[B, T, V]` (float32) and the updated cache. `image_features` skips the tower (precomputed)."""
    lm_params = {k: v for k, v in params.items() if k != "vision"}
    if workflow == iaa.TEXT:
        if not config.is_iaa:
            raise ValueError("the text workflow exists only for IAA models (a LLaVA-style model has one LLM)")
        return lm_module(config).apply({"params": lm_params}, input_ids, positions, workflow=iaa.TEXT,
                                       segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, cache=cache,
                                       cache_index=cache_index)
    if image_features is None and pixel_values is not None:
        image_features = encode_images(params, config, pixel_values)
    if image_features is not None and image_mask is None:
        image_mask = input_ids == config.image_token_id
    kw: dict[str, Any] = dict(image_features=image_features, image_mask=image_mask, segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, cache=cache, cache_index=cache_index)
    if config.is_iaa:
        kw["workflow"] = workflow
    return lm_module(config).apply({"params": lm_params}, input_ids, positions, **kw)


def init_cache(config: VLMConfig, workflow: str, batch: int, max_len: int) -> Any:
    if config.is_iaa:
        return iaa.init_cache(config.lm, workflow, batch, max_len)
    from mm.models import llm

    return llm.init_cache(config.lm.llm, batch, max_len)


def decode_fns(config: VLMConfig, workflow: str = "mm") -> Any:
    """Prefill/step for `mm.generate.Generator`; `pixel_values` and `image_mask` go to prefill as extras."""
    from mm import generate

    def apply(params: Any, ids: Array, positions: Array, **kw: Any) -> tuple[Array, Any]:
        return forward(params, config, ids, positions=positions, workflow=workflow, **kw)

    return generate.decode_fns(apply, lambda b, n: init_cache(config, workflow, b, n))


def abstract_params(config: VLMConfig) -> dict[str, Any]:
    """Boxed shapes of the whole tree (`vision` and the LLM side, logical axis names included), nothing allocated."""
    lm = iaa.abstract_params(config.lm) if config.is_iaa else llava.abstract_params(config.lm)
    return {"vision": vision.abstract_params(config.vision), **lm}


def init_params(config: VLMConfig, vision_params: Any, llm_params: Any, rng: Array) -> dict[str, Any]:
    """A fresh VLM around pretrained tower and LLM params (IAA branches copied from the base)."""
    lm = (iaa.init_params(config.lm, llm_params, rng) if config.is_iaa
          else llava.init_params(config.lm, llm_params, rng))
    return {"vision": vision_params, **lm}
