"""The decoder LLM (Llama family, Qwen2): RMSNorm, RoPE (incl. `llama3` scaling), GQA attention, SwiGLU.

Parameter names mirror HuggingFace so the converters are plain renames and the tree reads like the HF
module tree: `embed_tokens/embedding`, `layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}`,
`layers_{i}/mlp/{gate,up,down}_proj/kernel`, `layers_{i}/{input,post_attention}_layernorm/scale`,
`norm/scale`, `lm_head/kernel` (absent when embeddings are tied). Projection kernels keep heads as their
own axis (`q_proj/kernel` is `[embed, heads, head_dim]`) so each axis has a logical name of its own.
With `scan_layers=True` the layers live under `layers/...` with a leading `layers` axis instead
(`scan_params` / `unscan_params` convert); checkpoints on disk always use the per-layer layout.

KV caches are explicit values, not Flax variables: `init_cache` makes one, every call takes and returns it,
so each workflow of a multimodal model can keep its own cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mm.attention import attention
from mm.config import LLMConfig, RopeScaling
from mm.models import lora, protocol
from mm.models.partitioning import KERNEL_INIT, constrain, param

Array = jax.Array
Cache = dict[str, Any]





# ------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Array:
    """Inverse frequencies `[head_dim // 2]`, with Llama-3.1 wavelength-dependent scaling when given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Array, inv_freq: Array, dtype: Any) -> tuple[Array, Array]:
    """cos/sin `[B, T, head_dim]` (halves duplicated, HF's rotate-half layout), computed in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `[B, T, H, D]` by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """RMSNorm as Llama computes it: normalise in float32, cast back, then scale."""

    dim: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; appends to a KV cache when one is passed."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask_args: Mapping[str, Any],
                 cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        hq, hkv, hd = c.num_heads, c.num_kv_heads, c.head_dim

        def proj(name: str, heads: int, head_axis: str) -> Array:
            sub = _Proj(features=(heads, hd), axes=("embed", head_axis, "head_dim"), use_bias=c.attention_bias,
                        dtype=dt, param_dtype=pdt, name=name)
            return sub(x)

        q = checkpoint_name(proj("q_proj", hq, "heads"), "query_proj")
        k = checkpoint_name(proj("k_proj", hkv, "kv_heads"), "key_proj")
        v = checkpoint_name(proj("v_proj", hkv, "kv_heads"), "value_proj")
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

        new_cache = None
        kv_args = dict(mask_args)
        if cache is not None:
            idx = jnp.asarray(cache_index, jnp.int32)
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, idx, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, idx, 0, 0))
            new_cache = {"k": ck, "v": cv}
            k, v = ck.astype(dt), cv.astype(dt)
            kv_args["q_offset"] = idx
            if "bidirectional_ids" in kv_args and "kv_bidirectional_ids" not in kv_args:
                # Image spans of this chunk at its cache slots (0 elsewhere): a prefill's image tokens see each
                # other; a span is never split across chunks here (the prompt's images arrive in one prefill).
                b = kv_args["bidirectional_ids"]
                kv_args["kv_bidirectional_ids"] = jax.lax.dynamic_update_slice(
                    jnp.zeros((b.shape[0], ck.shape[1]), b.dtype), b, (0, idx))
        out = attention(q, k, v, causal=True, implementation=c.attention_impl, **kv_args)
        out = constrain(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        y = _OutProj(features=c.hidden_size, in_shape=(hq, hd), dtype=dt, param_dtype=pdt, name="o_proj")(out)
        return y, new_cache


class _Proj(nn.Module):
    """`[B, T, D] -> [B, T, heads, head_dim]` with a `[D, heads, head_dim]` kernel (and optional bias)."""

    features: tuple[int, int]
    axes: tuple[str, str, str]
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = param(self, "kernel", KERNEL_INIT, (x.shape[-1], *self.features), self.axes, self.param_dtype)
        y = lora.add(self, x, jnp.einsum("btd,dhk->bthk", x, w.astype(self.dtype)), self.axes, 1)
        if self.use_bias:
            b = param(self, "bias", nn.initializers.zeros, self.features, self.axes[1:], self.param_dtype)
            y = y + b.astype(self.dtype)
        return y


class _OutProj(nn.Module):
    """`[B, T, heads, head_dim] -> [B, T, D]` with a `[heads, head_dim, D]` kernel."""

    features: int
    in_shape: tuple[int, int]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axes = ("heads", "head_dim", "embed")
        w = param(self, "kernel", KERNEL_INIT, (*self.in_shape, self.features), axes, self.param_dtype)
        return lora.add(self, x, jnp.einsum("bthk,hkd->btd", x, w.astype(self.dtype)), axes, 2)


class Dense(nn.Module):
    """Bias-free dense layer with logical axes on its kernel (LoRA-adaptable unless `adaptable=False`)."""

    features: int
    axes: tuple[str, str]
    dtype: Any
    param_dtype: Any
    adaptable: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = param(self, "kernel", KERNEL_INIT, (x.shape[-1], self.features), self.axes, self.param_dtype)
        y = jnp.einsum("...d,df->...f", x, w.astype(self.dtype))
        return lora.add(self, x, y, self.axes, 1) if self.adaptable else y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        gate = Dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """Pre-norm decoder block. IAA's insertion layers are instances of this same module."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask_args: Mapping[str, Any],
                 cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, name="input_layernorm", **kw)(x)
        a, new_cache = Attention(c, name="self_attn")(h, cos, sin, mask_args, cache, cache_index)
        x = x + a
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(c, name="mlp")(h)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


def remat_policy(name: str) -> Any:
    """Maps a config name to a `jax.checkpoint` policy (None: save nothing)."""
    cp = jax.checkpoint_policies
    return {
        "full": None,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
    }[name]


def layer_class(config: LLMConfig) -> type[nn.Module]:
    """DecoderLayer, wrapped in `nn.remat` when the config asks for rematerialisation."""
    if config.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=remat_policy(config.remat_policy), prevent_cse=not config.scan_layers)


class _ScannedLayer(nn.Module):
    """Adapter giving DecoderLayer the `(carry, xs) -> (carry, ys)` shape `nn.scan` wants."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x: Array, cache: Cache | None, cos: Array, sin: Array, mask_args: Mapping[str, Any],
                 cache_index: Array | None) -> tuple[Array, Cache | None]:
        return layer_class(self.config)(self.config, name="layer")(x, cos, sin, mask_args, cache, cache_index)


class LLM(nn.Module):
    """The decoder LLM. Methods `embed`, `run_layers`, `head` let composite models (IAA) reuse the parts."""

    config: LLMConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, c.params_dtype)
        if c.scan_layers:
            self.layers = nn.scan(
                _ScannedLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c)
        else:
            cls = layer_class(c)
            self.layers_list = [cls(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        if not c.tie_word_embeddings:
            # the loss reads its kernel directly (chunked cross-entropy): no adapter could act there
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), dtype=c.compute_dtype,
                                  param_dtype=c.params_dtype, adaptable=False)
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)

    def embed(self, input_ids: Array) -> Array:
        x = self.embed_tokens(input_ids).astype(self.config.compute_dtype)
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def rope(self, positions: Array) -> tuple[Array, Array]:
        return rope_cos_sin(positions, self.inv_freq, self.config.compute_dtype)

    def layer(self, i: int, x: Array, cos: Array, sin: Array, mask_args: Mapping[str, Any],
              cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        """Runs frozen layer `i` alone (unscanned models only); used by models that interleave layers."""
        if self.config.scan_layers:
            raise ValueError("LLM.layer(i) needs scan_layers=False")
        return self.layers_list[i](x, cos, sin, mask_args, cache, cache_index)

    def run_layers(self, x: Array, cos: Array, sin: Array, mask_args: Mapping[str, Any],
                   cache: Cache | None = None, cache_index: Array | None = None) -> tuple[Array, Cache | None]:
        if self.config.scan_layers:
            return self.layers(x, cache, cos, sin, mask_args, cache_index)
        new_cache = None if cache is None else []
        for i, layer in enumerate(self.layers_list):
            x, lc = layer(x, cos, sin, mask_args, None if cache is None else cache[i], cache_index)
            if cache is not None:
                new_cache.append(lc)
        return x, new_cache

    def head(self, x: Array) -> Array:
        """Final norm and LM head; logits in float32 whatever the compute dtype."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding.astype(self.config.compute_dtype)
            logits = jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, input_ids: Array | None = None, positions: Array | None = None, *,
                 inputs_embeds: Array | None = None, segment_ids: Array | None = None,
                 kv_segment_ids: Array | None = None, bidirectional_ids: Array | None = None,
                 cache: Cache | None = None, cache_index: Array | None = None,
                 return_hidden: bool = False) -> tuple[Array, Cache | None]:
        """Logits `[B, T, V]` (float32) and the updated cache (None when no cache was passed)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.compute_dtype)
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = self.rope(positions)
        mask_args = make_mask_args(segment_ids, kv_segment_ids, bidirectional_ids)
        x, new_cache = self.run_layers(x, cos, sin, mask_args, cache, cache_index)
        if return_hidden:
            return self.norm(x), new_cache
        return self.head(x), new_cache


class Embed(nn.Module):
    num_embeddings: int
    features: int
    param_dtype: Any

    def setup(self) -> None:
        self.embedding = param(self, "embedding", nn.initializers.normal(stddev=0.02),
                                (self.num_embeddings, self.features), ("vocab", "embed"), self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0)


def make_mask_args(segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
                   bidirectional_ids: Array | None = None) -> dict[str, Any]:
    """Keyword arguments for `mm.attention.attention` (only the ones that are set)."""
    out: dict[str, Any] = {}
    if segment_ids is not None:
        out["segment_ids"] = segment_ids
    if kv_segment_ids is not None:
        out["kv_segment_ids"] = kv_segment_ids
    if bidirectional_ids is not None:
        out["bidirectional_ids"] = bidirectional_ids
    return out


# ------------------------------------------------------------------------------------------ cache
def init_cache(config: LLMConfig, batch: int, max_len: int, dtype: Any = None) -> Any:
    """Zeroed KV cache for `max_len` slots: a list per layer, or stacked `[L, ...]` when scanning."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    if config.scan_layers:
        shape = (config.num_layers, *shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)]


# ------------------------------------------------------------------------------- param layouts
def scan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer params (`layers_{i}`) -> scanned layout (`layers/layer/...` with a leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
    return out


def unscan_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned layout -> per-layer params (`layers_{i}`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]["layer"]
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def abstract_params(config: LLMConfig, batch: int = 1, seq: int = 8) -> Any:
    """Shapes/dtypes and logical partitioning of the params, without allocating them."""
    model = LLM(config)
    ids = jnp.zeros((batch, seq), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def init_params(config: LLMConfig, rng: Array, batch: int = 1, seq: int = 8) -> Any:
    """Randomly initialised params (boxes stripped)."""
    model = LLM(config)
    ids = jnp.zeros((batch, seq), jnp.int32)
    return nn.unbox(model.init(rng, ids))["params"]


# ------------------------------------------------------------------------------------- decoding
def decode_fns(config: LLMConfig) -> Any:
    """Prefill / step / cache functions that plug this LLM into `mm.generate.Generator`."""
    return LLMKind(config).decode_fns("text")


def adapter_candidates(config: LLMConfig) -> dict[str, Any]:
    """The flat ('/'-joined) abstract params of `config` (per-layer layout) with rank-1 LoRA adapters on every
    adaptable kernel: what reading a PEFT adapter (`mm.convert.peft_adapter.read_peft`) needs to know each
    kernel's in / out split."""
    from flax import traverse_util

    with lora.candidates():
        tree = nn.unbox(abstract_params(dataclasses.replace(config, scan_layers=False)))
    return traverse_util.flatten_dict(tree, sep="/")


# ------------------------------------------------------------------------------------- the kind
@dataclasses.dataclass(frozen=True)
class LLMKind(protocol.KindDefaults):
    """The plain decoder LLM as a `mm.models.protocol.ModelKind`: one workflow, "text"; no image inputs."""

    config: LLMConfig
    name = "llm"
    base_prefix = ""
    workflows = ("text",)

    @property
    def llm(self) -> LLMConfig:
        return self.config

    def abstract_params(self) -> Any:
        return abstract_params(self.config)

    def init_params(self, rng: Array, llm_params: Any = None, vision_params: Any = None) -> Any:
        return init_params(self.config, rng) if llm_params is None else llm_params

    def apply(self, params: Any, input_ids: Array, positions: Array | None = None, *, workflow: str = "text",
              image_features: Array | None = None, image_mask: Array | None = None,
              pixel_values: Array | None = None, **kw: Any) -> tuple[Array, Any]:
        protocol.check_workflow(self, workflow)
        if image_features is not None or pixel_values is not None:
            raise ValueError("llm: a text-only LLM takes no image inputs")
        return LLM(self.config).apply({"params": params}, input_ids, positions, **kw)

    def head_params(self, params: Any, workflow: str) -> Any:
        return params

    def init_cache(self, workflow: str, batch: int, max_len: int) -> Any:
        return init_cache(self.config, batch, max_len)

    def stages(self, seq_len: int, workflow: str = "text") -> list[protocol.Stage]:
        return protocol.llm_stages("", self.config, seq_len)
