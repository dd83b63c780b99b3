"""LLaVA-style bridge model (DESIGN.md section 3): the baseline IAA is measured against.

Image features -> projector -> spliced at `image_mask` into the LLM's own token embeddings -> the LLM, whose
weights may be frozen (stage 1) or trained (stage 2) - that is decided by the training config's parameter
groups, not here. Params: `{"llm": <LLM params>, "projector": ...}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.config import LLaVAConfig
from mm.models import llm, protocol
from mm.models.connectors import Projector
from mm.models.splice import image_span_ids, splice_image_features

Array = jax.Array


class LLaVA(nn.Module):
    config: LLaVAConfig

    def setup(self) -> None:
        self.llm = llm.LLM(self.config.llm)
        self.projector = Projector(self.config.projector)

    def __call__(self, input_ids: Array, positions: Array | None = None, *, image_features: Array | None = None,
                 image_mask: Array | None = None, segment_ids: Array | None = None,
                 kv_segment_ids: Array | None = None, cache: Any = None,
                 cache_index: Array | None = None, return_hidden: bool = False) -> tuple[Array, Any]:
        """Logits `[B, T, V]` (float32) and the updated cache; `return_hidden` gives the final-normed hidden
        states instead (for a loss that applies the head in chunks)."""
        x = self.llm.embed(jnp.maximum(input_ids, 0))
        if image_features is not None:
            x = splice_image_features(x, self.projector(image_features), image_mask)
        bidir = None
        if self.config.bidirectional_image_attention and image_mask is not None:
            bidir = image_span_ids(image_mask)
        return self.llm(None, positions, inputs_embeds=x, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        bidirectional_ids=bidir, cache=cache, cache_index=cache_index, return_hidden=return_hidden)


def init_params(config: LLaVAConfig, llm_params: Mapping[str, Any], rng: Array) -> dict[str, Any]:
    """LLaVA params around existing LLM params and a freshly initialised projector."""
    proj = Projector(config.projector).init(rng, jnp.zeros((1, 1, config.projector.input_width), jnp.float32))
    return {"llm": llm_params, "projector": nn.unbox(proj)["params"]}


def abstract_params(config: LLaVAConfig) -> Any:
    ids = jnp.zeros((1, 8), jnp.int32)
    feats = jnp.zeros((1, 2, config.projector.input_width), jnp.float32)
    mask = jnp.zeros((1, 8), bool).at[:, :2].set(True)
    return jax.eval_shape(lambda: LLaVA(config).init(jax.random.PRNGKey(0), ids, image_features=feats,
                                                     image_mask=mask))["params"]


def decode_fns(config: LLaVAConfig) -> Any:
    """Prefill/step functions for `mm.generate.Generator`; image inputs go to prefill as `extra` kwargs."""
    return LLaVAKind(config).decode_fns("mm")


@dataclasses.dataclass(frozen=True)
class LLaVAKind(protocol.KindDefaults):
    """The LLaVA-style bridge as a `mm.models.protocol.ModelKind`: one workflow, "mm"; params `llm`, `projector`."""

    config: LLaVAConfig
    name = "llava"
    base_prefix = "llm"
    workflows = ("mm",)

    @property
    def llm(self) -> Any:
        return self.config.llm

    def abstract_params(self) -> Any:
        return abstract_params(self.config)

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> Any:
        k1, k2, _ = jax.random.split(rng, 3)  # the third initialises a VLM's tower (`vlm.VLMKind`)
        return init_params(self.config, llm.init_params(self.llm, k1) if llm_params is None else llm_params, k2)

    def apply(self, params: Any, input_ids: Array, positions: Array | None = None, *, workflow: str = "mm",
              pixel_values: Array | None = None, **kw: Any) -> tuple[Array, Any]:
        protocol.check_workflow(self, workflow)
        if pixel_values is not None:
            raise ValueError("llava: pixel_values need the tower (a VLM); pass image_features")
        return LLaVA(self.config).apply({"params": params}, input_ids, positions, **kw)

    def head_params(self, params: Any, workflow: str) -> Any:
        return params["llm"]

    def init_cache(self, workflow: str, batch: int, max_len: int) -> Any:
        return llm.init_cache(self.config.llm, batch, max_len)

    def stages(self, seq_len: int, workflow: str = "mm") -> list[protocol.Stage]:
        return protocol.projector_stages("projector", self.config.projector) + protocol.llm_stages(
            "llm", self.llm, seq_len)
