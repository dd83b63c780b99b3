"""A vision-language model = a ViT tower + an LLM-side model (IAA or LLaVA-style), as plain functions.

Params are one flat tree: `{"vision": <VisionTower params>, **<IAA or LLaVA params>}` (IAA: `base`, `mm`,
`g`; LLaVA: `llm`, `projector`), so parameter-group regexes see paths like `vision/encoder/layers_23/...`
and `mm/layers_3/...` directly. Images arrive as `pixel_values` `[B, N, C, H, W]` (N images or tiles per
row, rows with fewer padded at the end); their features are concatenated per row in order, and the LLM-side
model splices them at `image_mask` (`input_ids == image_token_id` unless given).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mm.config import ConfigError, VisionConfig
from mm.models import iaa, llava, vision
from mm.models.iaa import IAAConfig
from mm.models.llava import LLaVAConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig = VisionConfig()
    lm: IAAConfig | LLaVAConfig = LLaVAConfig()
    feature_layer: int = -2  # penultimate layer, as LLaVA and IAA
    feature: str = "patch"  # "patch" drops CLIP's class token, "cls_patch" keeps it
    image_token_id: int = -200

    def __post_init__(self) -> None:
        widths = ([b.projector.in_dim for b in self.lm.branches] if isinstance(self.lm, IAAConfig)
                  else [self.lm.projector.in_dim])
        if any(w != self.vision.hidden_size for w in widths):
            raise ConfigError(f"projector in_dim {widths} != vision.hidden_size {self.vision.hidden_size}")

    @property
    def is_iaa(self) -> bool:
        return isinstance(self.lm, IAAConfig)

    @property
    def tokens_per_image(self) -> int:
        n = (self.vision.image_size // self.vision.patch_size) ** 2
        return n + (1 if self.feature == "cls_patch" else 0)

    @property
    def workflows(self) -> tuple[str, ...]:
        return self.lm.workflows if self.is_iaa else ("mm",)


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
    from mm.generate import DecodeFns

    def prefill(params: Any, ids: Array, positions: Array, mask: Array, kv_mask: Array, cache: Any,
                pixel_values: Array | None = None, image_mask: Array | None = None) -> tuple:
        if image_mask is None and pixel_values is not None:
            image_mask = ids == config.image_token_id
        logits, cache = forward(params, config, ids, pixel_values=pixel_values, image_mask=image_mask,
                                workflow=workflow, positions=positions, segment_ids=mask, kv_segment_ids=kv_mask,
                                cache=cache, cache_index=0)
        return logits[:, -1], cache

    def step(params: Any, tok: Array, positions: Array, kv_mask: Array, cache: Any, index: Array) -> tuple:
        logits, cache = forward(params, config, tok, workflow=workflow, positions=positions,
                                segment_ids=jnp.ones(tok.shape, jnp.int32), kv_segment_ids=kv_mask, cache=cache,
                                cache_index=index)
        return logits[:, -1], cache

    return DecodeFns(prefill=prefill, step=step, init_cache=lambda b, n: init_cache(config, workflow, b, n))


def with_runtime(config: VLMConfig, **options: Any) -> VLMConfig:
    """The config with run-time options (`dtype`, `param_dtype`, `attention_impl`) set in every sub-config
    that has them: the tower, the LLM and each projector (projectors have no attention)."""
    proj_opts = {k: v for k, v in options.items() if k != "attention_impl"}
    lm = config.lm
    if config.is_iaa:
        lm = dataclasses.replace(lm, llm=lm.llm.replace(**options), branches=tuple(
            dataclasses.replace(b, projector=dataclasses.replace(b.projector, **proj_opts)) for b in lm.branches))
    else:
        lm = dataclasses.replace(lm, llm=lm.llm.replace(**options),
                                 projector=dataclasses.replace(lm.projector, **proj_opts))
    return dataclasses.replace(config, vision=config.vision.replace(**options), lm=lm)


def abstract_params(config: VLMConfig) -> dict[str, Any]:
    """Boxed shapes of the whole tree (`vision` and the LLM side, logical axis names included), nothing allocated."""
    lm = iaa.abstract_params(config.lm) if config.is_iaa else llava.abstract_params(config.lm)
    return {"vision": vision.abstract_params(config.vision), **lm}


def init_params(config: VLMConfig, vision_params: Any, llm_params: Any, rng: Array) -> dict[str, Any]:
    """A fresh VLM around pretrained tower and LLM params (IAA branches copied from the base)."""
    lm = (iaa.init_params(config.lm, llm_params, rng) if config.is_iaa
          else llava.init_params(config.lm, llm_params, rng))
    return {"vision": vision_params, **lm}


# ------------------------------------------------------------------------------------------- json
def config_to_json(config: VLMConfig) -> dict[str, Any]:
    """A JSON-able dict that `config_from_json` reads back into an equal config."""
    lm = config.lm
    if config.is_iaa:
        lm_d = {"kind": "iaa", "llm": lm.llm.to_json_dict(),
                "branches": [{"name": b.name, "positions": list(b.positions), "projector": b.projector.to_json_dict()}
                             for b in lm.branches],
                "bidirectional_image_attention": lm.bidirectional_image_attention}
    else:
        lm_d = {"kind": "llava", "llm": lm.llm.to_json_dict(), "projector": lm.projector.to_json_dict(),
                "bidirectional_image_attention": lm.bidirectional_image_attention}
    return {"vision": config.vision.to_json_dict(), "lm": lm_d, "feature_layer": config.feature_layer,
            "feature": config.feature, "image_token_id": config.image_token_id}


def config_from_json(d: dict[str, Any], source: str = "vlm config") -> VLMConfig:
    from mm.config import LLMConfig
    from mm.models.connectors import ProjectorConfig

    lm_d = d["lm"]
    llm_cfg = LLMConfig.from_json_dict(lm_d["llm"], source=f"{source}: lm.llm")
    if lm_d["kind"] == "iaa":
        branches = tuple(iaa.BranchConfig(b["name"], tuple(b["positions"]),
                                          ProjectorConfig.from_json_dict(b["projector"], f"{source}: projector"))
                         for b in lm_d["branches"])
        lm = IAAConfig(llm=llm_cfg, branches=branches,
                       bidirectional_image_attention=lm_d.get("bidirectional_image_attention", False))
    elif lm_d["kind"] == "llava":
        lm = LLaVAConfig(llm=llm_cfg, projector=ProjectorConfig.from_json_dict(lm_d["projector"], source),
                         bidirectional_image_attention=lm_d.get("bidirectional_image_attention", False))
    else:
        raise ConfigError(f"{source}: lm.kind={lm_d['kind']!r}; choose iaa or llava")
    return VLMConfig(vision=VisionConfig.from_json_dict(d["vision"], source=f"{source}: vision"), lm=lm,
                     feature_layer=int(d["feature_layer"]), feature=d["feature"],
                     image_token_id=int(d["image_token_id"]))
