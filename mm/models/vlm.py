"""A vision-language model = a ViT tower (POINTS: two) + an LLM-side model kind (IAA or LLaVA-style): `VLMKind`.

Params are one flat tree: `{"vision": <VisionTower params>, **<IAA or LLaVA params>}` (IAA: `base`, `mm`,
`g`; LLaVA: `llm`, `projector`), so parameter-group regexes see paths like `vision/encoder/layers_23/...`
and `mm/layers_3/...` directly. Images arrive as `pixel_values` `[B, N, C, H, W]` (N images or tiles per
row, rows with fewer padded at the end) or `[B, C, H, W]` (one a row); their features are concatenated per row
in order, and the LLM-side model splices them at `image_mask` (`input_ids == image_token_id` unless given).
POINTS (DESIGN.md section 4) is this kind with `VLMConfig.ocr_vision` (an OCR ViT of the same architecture,
params `ocr_vision/`) and `pixel_shuffle`: each tower's penultimate layer (class token dropped) of every CATTY tile
and thumbnail is pixel-shuffled (24x24 -> 12x12 positions of 4C per 336 tile), the two sit side by side on the
channel axis, and the LM side's one projector projects each and merges them `w * general + (1 - w) * ocr`
(`ProjectorConfig.merge`). One tower with `pixel_shuffle` is the single-ViT variant.
Get one with `mm.models.kinds.of(config)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

import jax.numpy as jnp

from mm.config import TEXT, VLMConfig
from mm.models import connectors, protocol, vision
from mm.models.partitioning import constrain

Array = jax.Array
TOWERS = ("vision", "ocr_vision")  # the param subtrees a VLM's ViTs live in (`VLMConfig.towers`)


def encode_images(vision_params: Any, vc: Any, pixel_values: Array, layer: int = -2, feature: str = "patch",
                  shuffle: bool = False) -> Array:
    """`[B, N, C, H, W]` (or `[B, C, H, W]`) -> features `[B, N * tokens_per_image, width]` of tower `vc`'s
    hidden state `layer`, in the order the splice fills a row's image positions. `shuffle`: each image's (tile's)
    patch grid pixel-shuffled (`mm.models.connectors.pixel_shuffle`: a quarter of the tokens, 4x the width)."""
    lead = pixel_values.shape[:-3]
    flat = pixel_values.reshape((-1,) + pixel_values.shape[-3:])
    feats = vision.image_features(vision_params, vc, flat, layer, feature)
    if shuffle:
        feats = connectors.pixel_shuffle(feats, (flat.shape[-2] // vc.patch_size, flat.shape[-1] // vc.patch_size))
    feats = constrain(feats, ("act_batch", "act_length", "act_embed"))
    if len(lead) == 1:
        return feats
    return feats.reshape(lead[0], lead[1] * feats.shape[1], feats.shape[2])


def _without_vision(params: Any) -> Any:
    return {k: v for k, v in params.items() if k not in TOWERS}


@dataclasses.dataclass(frozen=True)
class VLMKind(protocol.KindDefaults):
    """The tower in front of `lm` (the kind of `config.lm`) as one `mm.models.protocol.ModelKind`."""

    config: VLMConfig
    lm: Any  # the LLM-side ModelKind
    name = "vlm"

    @property
    def llm(self) -> Any:
        return self.lm.llm

    @property
    def base_prefix(self) -> str:
        return self.lm.base_prefix

    @property
    def workflows(self) -> tuple[str, ...]:
        return self.lm.workflows

    @property
    def frozen(self) -> tuple[str, ...]:
        return self.lm.frozen

    def trained_workflow(self, requested: str) -> str:
        return self.lm.trained_workflow(requested)

    def abstract_params(self) -> dict[str, Any]:
        return {**{name: vision.abstract_params(vc) for name, vc in self.config.towers}, **self.lm.abstract_params()}

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> dict[str, Any]:
        """The LLM side as its kind initialises it from `rng`; the tower (random from `rng`'s third split when
        None) under `vision`, an OCR tower random from the fourth."""
        keys = jax.random.split(rng, 4)
        if vision_params is None:
            vision_params = vision.init_params(self.config.vision, keys[2])
        out = {"vision": vision_params}
        if self.config.ocr_vision is not None:
            out["ocr_vision"] = vision.init_params(self.config.ocr_vision, keys[3])
        return {**out, **self.lm.init_params(rng, llm_params)}

    def image_features(self, params: Any, pixel_values: Array) -> Array:
        """Every tower's features of the same pixels, side by side on the last axis (what the projector's
        `merge` splits): `[B, N * tokens_per_image, towers * width]`."""
        c = self.config
        feats = [encode_images(params[name], vc, pixel_values, c.feature_layer, c.feature, c.pixel_shuffle)
                 for name, vc in c.towers]
        return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)

    def apply(self, params: Any, input_ids: Array, positions: Array | None = None, *, workflow: str = "mm",
              image_features: Array | None = None, image_mask: Array | None = None,
              pixel_values: Array | None = None, **kw: Any) -> tuple[Array, Any]:
        """`image_features` skips the tower (precomputed); the text workflow (IAA) takes no image inputs."""
        protocol.check_workflow(self, workflow)
        lm_params = _without_vision(params)
        if workflow == TEXT:
            return self.lm.apply(lm_params, input_ids, positions, workflow=TEXT, **kw)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(params, pixel_values)
        if image_features is not None and image_mask is None:
            image_mask = input_ids == self.config.image_token_id
        return self.lm.apply(lm_params, input_ids, positions, workflow=workflow, image_features=image_features,
                             image_mask=image_mask, **kw)

    def head_params(self, params: Any, workflow: str) -> Any:
        return self.lm.head_params(params, workflow)

    def init_cache(self, workflow: str, batch: int, max_len: int) -> Any:
        return self.lm.init_cache(workflow, batch, max_len)

    def stages(self, seq_len: int, workflow: str = "mm", tiles_per_row: int = 1) -> list[protocol.Stage]:
        """Each tower's layers up to the feature layer (per patch token of the `tiles_per_row` tiles a row's
        pixels hold, padding tiles included - the tower runs on them - scaled to text tokens; the towers are
        parallel branches), then the LLM side's; the text workflow runs no tower."""
        out = self.lm.stages(seq_len, workflow)
        if workflow == TEXT:
            return out
        towers = []
        for name, vc in self.config.towers:
            n_vis = vc.grid_size ** 2 + (1 if vc.has_class_token else 0)
            upto = vision.select_layer_index(self.config.feature_layer, vc.num_layers)
            towers += protocol.vit_stages(name, vc, n_vis, tiles_per_row * n_vis / seq_len, upto)
        return towers + out

    def derived(self) -> dict[str, str]:
        return self.lm.derived()
