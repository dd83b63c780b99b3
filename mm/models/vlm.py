"""A vision-language model = a ViT tower + an LLM-side model kind (IAA or LLaVA-style): `VLMKind`.

Params are one flat tree: `{"vision": <VisionTower params>, **<IAA or LLaVA params>}` (IAA: `base`, `mm`,
`g`; LLaVA: `llm`, `projector`), so parameter-group regexes see paths like `vision/encoder/layers_23/...`
and `mm/layers_3/...` directly. Images arrive as `pixel_values` `[B, N, C, H, W]` (N images or tiles per
row, rows with fewer padded at the end) or `[B, C, H, W]` (one a row); their features are concatenated per row
in order, and the LLM-side model splices them at `image_mask` (`input_ids == image_token_id` unless given).
Get one with `mm.models.kinds.of(config)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mm.config import TEXT, VLMConfig
from mm.models import protocol, vision

Array = jax.Array


def encode_images(vision_params: Any, vc: Any, pixel_values: Array, layer: int = -2, feature: str = "patch") -> Array:
    """`[B, N, C, H, W]` (or `[B, C, H, W]`) -> features `[B, N * tokens_per_image, vision width]` of tower `vc`'s
    hidden state `layer`, in the order the splice fills a row's image positions."""
    if pixel_values.ndim == 4:
        return vision.image_features(vision_params, vc, pixel_values, layer, feature)
    b, n = pixel_values.shape[:2]
    feats = vision.image_features(vision_params, vc, pixel_values.reshape((b * n,) + pixel_values.shape[2:]),
                                  layer, feature)
    return feats.reshape(b, n * feats.shape[1], feats.shape[2])


def _without_vision(params: Any) -> Any:
    return {k: v for k, v in params.items() if k != "vision"}


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
        return {"vision": vision.abstract_params(self.config.vision), **self.lm.abstract_params()}

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> dict[str, Any]:
        """The LLM side as its kind initialises it from `rng`; the tower (random from `rng`'s third split when
        None) under `vision`."""
        if vision_params is None:
            vision_params = vision.init_params(self.config.vision, jax.random.split(rng, 3)[2])
        return {"vision": vision_params, **self.lm.init_params(rng, llm_params)}

    def image_features(self, params: Any, pixel_values: Array) -> Array:
        c = self.config
        return encode_images(params["vision"], c.vision, pixel_values, c.feature_layer, c.feature)

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

    def stages(self, seq_len: int, workflow: str = "mm") -> list[protocol.Stage]:
        """The tower's layers up to the feature layer (per patch token, scaled to text tokens), then the LLM
        side's; the text workflow runs no tower."""
        out = self.lm.stages(seq_len, workflow)
        if workflow == TEXT:
            return out
        vc = self.config.vision
        n_vis = vc.grid_size ** 2 + (1 if vc.has_class_token else 0)
        upto = vision.select_layer_index(self.config.feature_layer, vc.num_layers)
        return protocol.vit_stages("vision", vc, n_vis, n_vis / seq_len, upto) + out

    def derived(self) -> dict[str, str]:
        return self.lm.derived()
