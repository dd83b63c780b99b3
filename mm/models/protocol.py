"""What every model kind offers its callers - the trainer, the handles, PPL scoring - so none of them branch on
the kind: `ModelKind`, and the FLOPs `Stage`s a kind lists for `mm.train.flops`.

A kind is a small frozen object around a model config (`mm.models.kinds.of(config)` picks it): the plain LLM
(`llm.LLMKind`), the LLaVA-style bridge (`llava.LLaVAKind`), IAA (`iaa.IAAKind`) and a VLM, which is one of the
last two with a ViT tower in front (`vlm.VLMKind`). Params are one tree; `workflows` name the forward passes the
model has ("text" is the base LLM alone, "mm" / "g" are multimodal); every method takes the workflow it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from mm.config import LLMConfig

Array = jax.Array


class ModelKind(Protocol):
    name: str  # "llm" | "llava" | "iaa" | "vlm" (POINTS' dual tower too)
    llm: LLMConfig  # the base decoder LLM
    base_prefix: str  # where the base LLM's params live in the tree ("" llm, "llm" llava, "base" iaa)
    workflows: tuple[str, ...]
    frozen: tuple[str, ...]  # top-level subtrees no training changes (IAA's `base`: its text workflow is the LLM's)

    def trained_workflow(self, requested: str) -> str:
        """The workflow a multimodal stage trains when the config asks for `requested` (an IAA branch name;
        kinds with one workflow return it)."""

    def abstract_params(self) -> Any:
        """Boxed shapes of the whole tree (logical axis names included), nothing allocated."""

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> Any:
        """Fresh params around pretrained LLM (and tower) params; random ones where None."""

    def apply(self, params: Any, input_ids: Array, positions: Array | None = None, *, workflow: str,
              image_features: Array | None = None, image_mask: Array | None = None,
              pixel_values: Array | None = None, segment_ids: Array | None = None,
              kv_segment_ids: Array | None = None, cache: Any = None, cache_index: Array | None = None,
              return_hidden: bool = False) -> tuple[Array, Any]:
        """float32 logits `[B, T, V]` (or the final-normed hidden states) and the updated cache."""

    def head_params(self, params: Any, workflow: str) -> Any:
        """The subtree holding `workflow`'s LM head (`lm_head`, or `embed_tokens` when tied)."""

    def init_cache(self, workflow: str, batch: int, max_len: int) -> Any:
        """The zeroed KV cache of one workflow."""

    def decode_fns(self, workflow: str) -> Any:
        """`mm.generate.DecodeFns` of one workflow; image inputs go to prefill as extras."""

    def stages(self, seq_len: int, workflow: str) -> list[Stage]:
        """FLOPs stages of one workflow's forward, in order."""

    def derived(self) -> dict[str, str]:
        """Params that start as copies of others: target subtree -> source subtree ('/'-joined)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a forward pass for FLOPs counting (`mm.train.flops`)."""

    weights: tuple[str, ...] = ()  # '/'-joined param paths used as matmul weights (once per token)
    attn_flops: float = 0.0  # attention-core forward FLOPs per token (causal: half counted)
    touches: tuple[str, ...] = ()  # other params read here (embeddings, norms) - trainability only
    token_factor: float = 1.0  # this stage's tokens per text token (vision stages run on patches)
    # a parallel branch (POINTS' two towers): its stages see only their own branch's trainable params upstream;
    # the stages after it ("" - the main stream) see every branch's
    branch: str = ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def layer_stages(prefix: str, c: LLMConfig, seq_len: int) -> list[Stage]:
    """One decoder layer at `prefix`: QKV, the causal attention core, O, gate/up, down."""
    p = _join(prefix, "")
    attn = 0.5 * 4.0 * seq_len * c.num_heads * c.head_dim
    norms = (f"{p}input_layernorm/scale",)
    qkv = tuple(f"{p}self_attn/{n}_proj/kernel" for n in "qkv")
    bias = tuple(f"{p}self_attn/{n}_proj/bias" for n in "qkv") if c.attention_bias else ()
    return [Stage(qkv, 0.0, norms + bias), Stage((), attn), Stage((f"{p}self_attn/o_proj/kernel",)),
            Stage((f"{p}mlp/gate_proj/kernel", f"{p}mlp/up_proj/kernel"), 0.0, (f"{p}post_attention_layernorm/scale",)),
            Stage((f"{p}mlp/down_proj/kernel",))]


def embed_stage(prefix: str) -> Stage:
    return Stage((), 0.0, (_join(prefix, "embed_tokens/embedding"),))


def head_stage(prefix: str, c: LLMConfig) -> Stage:
    w = _join(prefix, "embed_tokens/embedding" if c.tie_word_embeddings else "lm_head/kernel")
    return Stage((w,), 0.0, (_join(prefix, "norm/scale"),))


def projector_stages(prefix: str, projector: Any) -> list[Stage]:
    """A `ProjectorConfig`'s Linears, once per feature source it merges (POINTS: general + OCR)."""
    return [Stage((f"{prefix}/linear_{k}/kernel",), 0.0, (f"{prefix}/linear_{k}/bias",), float(projector.sources))
            for k in range(projector.depth)]


def vit_stages(prefix: str, vc: Any, n_tokens: int, factor: float, upto: int) -> list[Stage]:
    """ViT layers 0..upto-1 (bidirectional attention: not halved), per patch token scaled by `factor`; a branch of
    its own (`prefix`), beside any other tower."""
    p = _join(prefix, "")
    out = [Stage((f"{p}embeddings/patch_embedding/kernel",), 0.0,
                 (f"{p}embeddings/class_embedding", f"{p}embeddings/position_embedding/embedding",
                  f"{p}pre_layrnorm/scale"), factor, prefix)]
    attn = 4.0 * n_tokens * vc.hidden_size
    for i in range(upto):
        q = f"{p}encoder/layers_{i}"
        out += [Stage(tuple(f"{q}/self_attn/{n}_proj/kernel" for n in "qkv"), 0.0, (f"{q}/layer_norm1/scale",), factor,
                      prefix),
                Stage((), attn, (), factor, prefix),
                Stage((f"{q}/self_attn/out_proj/kernel",), 0.0, (), factor, prefix),
                Stage((f"{q}/mlp/fc1/kernel",), 0.0, (f"{q}/layer_norm2/scale",), factor, prefix),
                Stage((f"{q}/mlp/fc2/kernel",), 0.0, (), factor, prefix)]
    return out


def llm_stages(prefix: str, c: LLMConfig, seq_len: int) -> list[Stage]:
    """A whole decoder LLM at `prefix`: embedding, every layer, final norm and head."""
    layers = [s for i in range(c.num_layers) for s in layer_stages(_join(prefix, f"layers_{i}"), c, seq_len)]
    return [embed_stage(prefix)] + layers + [head_stage(prefix, c)]


def check_workflow(kind: Any, workflow: str) -> None:
    if workflow not in kind.workflows:
        raise ValueError(f"{kind.name}: workflow {workflow!r}; this model has {kind.workflows}")


class KindDefaults:
    """What every kind shares: decode fns built from its own `apply` and `init_cache` (one construction,
    `mm.generate.decode_fns`), and the answers of a kind with one workflow, no derived and no frozen params."""

    frozen: tuple[str, ...] = ()

    def trained_workflow(self, requested: str) -> str:
        return self.workflows[0]

    def derived(self) -> dict[str, str]:
        return {}

    def decode_fns(self, workflow: str) -> Any:
        """`mm.generate.DecodeFns` of one workflow; image inputs go to prefill as extras."""
        from mm import generate

        check_workflow(self, workflow)
        return generate.decode_fns(lambda params, ids, positions, **kw: self.apply(
            params, ids, positions, workflow=workflow, **kw), lambda b, n: self.init_cache(workflow, b, n))
