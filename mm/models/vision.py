"""ViT image encoders: CLIP (class token, pre-layernorm) and SigLIP (no class token, post-layernorm).

One module, `VisionTower`, covers both kinds; `VisionConfig.model_type` picks the differences. Parameter
names mirror the HF module tree so the converter is a plain rename plus reshapes:
`embeddings/patch_embedding/kernel [p, p, C, D]` (+ `bias [D]` for SigLIP), `embeddings/class_embedding [D]`
(CLIP), `embeddings/position_embedding/embedding [N, D]`, `pre_layrnorm/{scale,bias}` (CLIP; HF's spelling),
`encoder/layers_{i}/{layer_norm1,layer_norm2}/{scale,bias}`,
`encoder/layers_{i}/self_attn/{q_proj,k_proj,v_proj}/{kernel [D, H, hd], bias [H, hd]}`,
`encoder/layers_{i}/self_attn/out_proj/{kernel [H, hd, D], bias [D]}`,
`encoder/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}`, `post_layernorm/{scale,bias}`, and for SigLIP with
`use_head` the attention-pooling head `head/{probe, attention/{in_proj,out_proj}, layernorm, mlp}`. Each encoder layer
is
its own subtree `encoder/layers_{i}/`, so training only the last k layers is a regex over paths.

Pixel values are channels-first `[B, C, H, W]`, exactly what HF image processors return, so one array feeds
both implementations. `hidden_states` follows HF's `output_hidden_states=True`: the embeddings output first
(after CLIP's pre-layernorm), then each layer's output; SigLIP's post-layernorm only enters
`last_hidden_state`, CLIP's only the pooled class token.

SigLIP's pooling head is implemented (and converted) but never used for VLM features; *choice*: keeping it
makes HF -> mm -> HF round trips exact and gives `pooler_output` parity, at the cost of a few params.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm.attention import attention
from mm.config import VisionConfig
from mm.models import lora
from mm.models.partitioning import KERNEL_INIT, constrain, param

Array = jax.Array
VisionOutput = dict[str, Any]

FEATURE_KINDS = ("patch", "cls_patch")




def activation(name: str) -> Callable[[Array], Array]:
    """HF's `ACT2FN` entries that vision towers use."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return functools.partial(jax.nn.gelu, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------- position interpolation
def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's a = -0.75."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` weights of torch's `interpolate(mode="bicubic", align_corners=False)` along one axis
    (border pixels replicated), so resizing is two small matmuls with static shapes."""
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            w[o, min(max(base + k, 0), in_size - 1)] += _cubic(np.asarray(frac - k))
    return w


def interpolate_positions(pos: Array, src_grid: int, new_grid: tuple[int, int]) -> Array:
    """Resamples a `[src_grid**2, D]` patch position table to `[gh * gw, D]` like HF's
    `interpolate_pos_encoding` (bicubic, align_corners=False), in float32."""
    gh, gw = new_grid
    if (gh, gw) == (src_grid, src_grid):
        return pos
    grid = pos.astype(jnp.float32).reshape(src_grid, src_grid, -1)
    wh = jnp.asarray(bicubic_matrix(src_grid, gh), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(src_grid, gw), jnp.float32)
    out = jnp.einsum("ai,ijd,bj->abd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(gh * gw, -1).astype(pos.dtype)


# ------------------------------------------------------------------------------------------ blocks
class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics (two-pass variance), scale and bias."""

    dim: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (self.dim,), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Linear(nn.Module):
    """Dense layer with bias; logical axes on kernel `[in, out]` and bias `[out]`."""

    features: int
    axes: tuple[str | None, str | None]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = param(self, "kernel", KERNEL_INIT, (x.shape[-1], self.features), self.axes, self.param_dtype)
        b = param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:], self.param_dtype)
        x = x.astype(self.dtype)
        y = jnp.einsum("...d,df->...f", x, w.astype(self.dtype)) + b.astype(self.dtype)
        return lora.add(self, x, y, self.axes, 1)


class _HeadProj(nn.Module):
    """`[B, T, D] -> [B, T, heads, head_dim]` with kernel `[D, heads, head_dim]` and bias `[heads, head_dim]`."""

    heads: int
    head_dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (self.heads, self.head_dim)
        axes = ("embed", "heads", "head_dim")
        w = param(self, "kernel", KERNEL_INIT, (x.shape[-1], *shape), axes, self.param_dtype)
        b = param(self, "bias", nn.initializers.zeros, shape, ("heads", "head_dim"), self.param_dtype)
        return lora.add(self, x, jnp.einsum("btd,dhk->bthk", x, w.astype(self.dtype)) + b.astype(self.dtype), axes, 1)


class _OutProj(nn.Module):
    """`[B, T, heads, head_dim] -> [B, T, D]` with kernel `[heads, head_dim, D]` and bias `[D]`."""

    features: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axes = ("heads", "head_dim", "embed")
        w = param(self, "kernel", KERNEL_INIT, (*x.shape[-2:], self.features), axes, self.param_dtype)
        b = param(self, "bias", nn.initializers.zeros, (self.features,), ("embed",), self.param_dtype)
        return lora.add(self, x, jnp.einsum("bthk,hkd->btd", x, w.astype(self.dtype)) + b.astype(self.dtype), axes, 2)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention (queries may come from a different sequence: the SigLIP probe)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None) -> Array:
        c = self.config
        kv = x if kv is None else kv
        kw = dict(heads=c.num_heads, head_dim=c.head_dim, dtype=c.compute_dtype, param_dtype=c.params_dtype)
        q = _HeadProj(name="q_proj", **kw)(x)
        k = _HeadProj(name="k_proj", **kw)(kv)
        v = _HeadProj(name="v_proj", **kw)(kv)
        heads = ("act_batch", "act_length", "act_heads", "act_head_dim")
        q, k, v = constrain(q, heads), constrain(k, heads), constrain(v, heads)
        out = constrain(attention(q, k, v, causal=False, implementation=c.attention_impl), heads)
        return _OutProj(c.hidden_size, c.compute_dtype, c.params_dtype, name="out_proj")(out)


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        h = activation(c.hidden_act)(Linear(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x))
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return Linear(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block (the same for CLIP and SigLIP)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        x = x + SelfAttention(c, name="self_attn")(LayerNorm(c.hidden_size, c.layer_norm_eps, name="layer_norm1",
                                                             **kw)(x))
        x = x + MLP(c, name="mlp")(LayerNorm(c.hidden_size, c.layer_norm_eps, name="layer_norm2", **kw)(x))
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class Encoder(nn.Module):
    """The layer stack; `layers_{i}` subtrees, run up to `num_layers` (all by default)."""

    config: VisionConfig

    def setup(self) -> None:
        self.layers = [EncoderLayer(self.config, name=f"layers_{i}") for i in range(self.config.num_layers)]

    def __call__(self, x: Array, num_layers: int | None = None) -> list[Array]:
        outs = []
        for layer in self.layers[: self.config.num_layers if num_layers is None else num_layers]:
            x = layer(x)
            outs.append(x)
        return outs


class Embeddings(nn.Module):
    """Patchify (a stride-p convolution written as one einsum), class token (CLIP), position table."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array, interpolate_pos_encoding: bool = False) -> Array:
        c = self.config
        b, ch, h, w = pixel_values.shape
        if ch != c.num_channels:
            raise ValueError(f"pixel_values has {ch} channels, the config {c.num_channels} (want [B, C, H, W])")
        p = c.patch_size
        gh, gw = h // p, w // p
        if not interpolate_pos_encoding and (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"input image size ({h}*{w}) doesn't match model ({c.image_size}*{c.image_size}); "
                             "pass interpolate_pos_encoding=True")
        pixels = pixel_values[:, :, : gh * p, : gw * p].astype(c.compute_dtype)
        patches = _PatchConv(c, name="patch_embedding")(pixels, gh, gw)
        pos_table = _PositionTable(c.num_positions, c.hidden_size, c.params_dtype, name="position_embedding")()
        if c.has_class_token:
            cls = param(self, "class_embedding", KERNEL_INIT, (c.hidden_size,), ("embed",), c.params_dtype)
            cls_tok = jnp.broadcast_to(cls.astype(c.compute_dtype), (b, 1, c.hidden_size))
            x = jnp.concatenate([cls_tok, patches], axis=1)
            pos = jnp.concatenate([pos_table[:1], interpolate_positions(pos_table[1:], c.grid_size, (gh, gw))])
        else:
            x = patches
            pos = interpolate_positions(pos_table, c.grid_size, (gh, gw))
        x = x + pos.astype(c.compute_dtype)[None]
        return constrain(x, ("act_batch", "act_length", "act_embed"))


class _PositionTable(nn.Module):
    """`position_embedding/embedding [num_positions, D]` (HF's `nn.Embedding` weight)."""

    num: int
    dim: int
    param_dtype: Any

    @nn.compact
    def __call__(self) -> Array:
        return param(self, "embedding", KERNEL_INIT, (self.num, self.dim), (None, "embed"), self.param_dtype)


class _PatchConv(nn.Module):
    """Non-overlapping stride-p convolution: kernel `[p, p, C, D]` (HWIO), bias only for SigLIP."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array, gh: int, gw: int) -> Array:
        c = self.config
        p = c.patch_size
        k = param(self, "kernel", KERNEL_INIT, (p, p, c.num_channels, c.hidden_size), (None, None, None, "embed"),
                   c.params_dtype)
        b = x.shape[0]
        xp = x.reshape(b, c.num_channels, gh, p, gw, p)
        y = jnp.einsum("bcipjq,pqcd->bijd", xp, k.astype(c.compute_dtype)).reshape(b, gh * gw, c.hidden_size)
        if not c.has_class_token:
            y = y + param(self, "bias", nn.initializers.zeros, (c.hidden_size,), ("embed",),
                           c.params_dtype).astype(c.compute_dtype)
        return y


class _FusedInProj(nn.Module):
    """torch `nn.MultiheadAttention`'s fused in-projection: `kernel [D, 3, H, hd]`, `bias [3, H, hd]`
    (q, k, v in that order)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, q_in: Array, kv_in: Array) -> tuple[Array, Array, Array]:
        c = self.config
        dt, shape = c.compute_dtype, (3, c.num_heads, c.head_dim)
        w = param(self, "kernel", KERNEL_INIT, (c.hidden_size, *shape), ("embed", None, "heads", "head_dim"),
                   c.params_dtype).astype(dt)
        b = param(self, "bias", nn.initializers.zeros, shape, (None, "heads", "head_dim"), c.params_dtype).astype(dt)
        q = jnp.einsum("btd,dhk->bthk", q_in, w[:, 0]) + b[0]
        k = jnp.einsum("btd,dhk->bthk", kv_in, w[:, 1]) + b[1]
        v = jnp.einsum("btd,dhk->bthk", kv_in, w[:, 2]) + b[2]
        return q, k, v


class _PoolingAttention(nn.Module):
    """Cross-attention from the probe to the tokens (`attention/{in_proj, out_proj}`, as HF names them)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, q_in: Array, kv_in: Array) -> Array:
        c = self.config
        q, k, v = _FusedInProj(c, name="in_proj")(q_in, kv_in)
        out = attention(q, k, v, causal=False, implementation=c.attention_impl)
        return _OutProj(c.hidden_size, c.compute_dtype, c.params_dtype, name="out_proj")(out)


class PoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends over the tokens, then LN + MLP residual."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        probe = param(self, "probe", KERNEL_INIT, (1, 1, c.hidden_size), (None, None, "embed"), c.params_dtype)
        q = jnp.broadcast_to(probe.astype(c.compute_dtype), (x.shape[0], 1, c.hidden_size))
        h = _PoolingAttention(c, name="attention")(q, x)
        ln = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                       name="layernorm")
        h = h + MLP(c, name="mlp")(ln(h))
        return h[:, 0]


class VisionTower(nn.Module):
    """The ViT. Returns `{"hidden_states": [embeddings, layer_1, ...], "last_hidden_state", "pooler_output"}`;
    with `num_layers=k` only the first k layers run (features from layer k, the rest `None`)."""

    config: VisionConfig

    def setup(self) -> None:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.embeddings = Embeddings(c)
        if c.has_class_token:
            self.pre_layrnorm = LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.encoder = Encoder(c)
        self.post_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        if c.use_head:
            self.head = PoolingHead(c)

    def __call__(self, pixel_values: Array, interpolate_pos_encoding: bool = False,
                 num_layers: int | None = None) -> VisionOutput:
        c = self.config
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        if c.has_class_token:
            x = self.pre_layrnorm(x)
        if num_layers is not None and not 0 <= num_layers <= c.num_layers:
            raise ValueError(f"num_layers={num_layers} outside [0, {c.num_layers}]")
        hidden = [x] + self.encoder(x, num_layers)
        out: VisionOutput = {"hidden_states": hidden, "last_hidden_state": None, "pooler_output": None}
        if num_layers is not None and num_layers < c.num_layers:
            return out
        last = hidden[-1]
        if c.has_class_token:
            out["last_hidden_state"] = last
            out["pooler_output"] = self.post_layernorm(last[:, 0])
        else:
            last = self.post_layernorm(last)
            out["last_hidden_state"] = last
            if c.use_head:
                out["pooler_output"] = self.head(last)
        return out


# ------------------------------------------------------------------------------------- features
def select_layer_index(layer: int, num_layers: int) -> int:
    """Index into the HF-style hidden-states list (length num_layers + 1) for a possibly negative `layer`."""
    n = num_layers + 1
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(f"feature layer {layer} out of range for {num_layers} layers (hidden states 0..{n - 1})")
    return idx


def select_features(hidden_states: Sequence[Array], layer: int = -2, feature: str = "patch", *,
                    has_class_token: bool) -> Array:
    """LLaVA's feature selection: hidden state `layer` (penultimate by default), class token dropped
    (`patch`) or kept (`cls_patch`). Towers without a class token return every token for `patch`."""
    if feature not in FEATURE_KINDS:
        raise ValueError(f"feature={feature!r}: choose one of {FEATURE_KINDS}")
    x = hidden_states[select_layer_index(layer, len(hidden_states) - 1)]
    if feature == "cls_patch":
        if not has_class_token:
            raise ValueError("feature='cls_patch' needs a tower with a class token (CLIP); SigLIP has none")
        return x
    return x[:, 1:] if has_class_token else x


def image_features(params: Any, config: VisionConfig, pixel_values: Array, layer: int = -2, feature: str = "patch",
                   interpolate_pos_encoding: bool = False) -> Array:
    """Selected features `[B, T, D]`, running only the layers needed (layer -2 skips the last one).
    Traceable: call it inside the model's jit / grad."""
    idx = select_layer_index(layer, config.num_layers)
    out = VisionTower(config).apply({"params": params}, pixel_values, interpolate_pos_encoding, num_layers=idx)
    return select_features(out["hidden_states"], -1, feature, has_class_token=config.has_class_token)


# --------------------------------------------------------------------------------- params / handle
def _dummy_pixels(config: VisionConfig, batch: int = 1) -> Array:
    return jnp.zeros((batch, config.num_channels, config.image_size, config.image_size), jnp.float32)


def abstract_params(config: VisionConfig) -> Any:
    """Shapes/dtypes and logical partitioning of the params, without allocating them."""
    model = VisionTower(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _dummy_pixels(config)))["params"]


@functools.lru_cache(maxsize=16)
def _compiled_init(config: VisionConfig) -> Callable[[Array], Any]:
    return jax.jit(lambda key: nn.unbox(VisionTower(config).init(key, _dummy_pixels(config)))["params"])


def init_params(config: VisionConfig, rng: Array) -> Any:
    """Randomly initialised params (boxes stripped); compiled once per config (faster than eager init)."""
    return _compiled_init(config)(rng)


@functools.partial(jax.jit, static_argnames=("config", "interpolate_pos_encoding", "num_layers"))
def apply(params: Any, config: VisionConfig, pixel_values: Array, interpolate_pos_encoding: bool = False,
          num_layers: int | None = None) -> VisionOutput:
    """Jitted forward pass (compiled once per config and input shape)."""
    return VisionTower(config).apply({"params": params}, pixel_values, interpolate_pos_encoding, num_layers)


def _needs_interpolation(config: VisionConfig, pixel_values: Any) -> bool:
    return tuple(np.shape(pixel_values)[-2:]) != (config.image_size, config.image_size)


def hidden_states(params: Any, config: VisionConfig, pixel_values: Any,
                  interpolate_pos_encoding: bool | None = None) -> list[np.ndarray]:
    """HF's `output_hidden_states=True` list as numpy: embeddings output, then each layer. For the model
    handle. `interpolate_pos_encoding=None` interpolates exactly when the image size differs from the config."""
    interp = interpolate_pos_encoding
    interp = _needs_interpolation(config, pixel_values) if interp is None else interp
    out = apply(params, config, jnp.asarray(pixel_values), interp)
    return [np.asarray(h) for h in out["hidden_states"]]


def last_hidden_state(params: Any, config: VisionConfig, pixel_values: Any,
                      interpolate_pos_encoding: bool | None = None) -> np.ndarray:
    """HF's `last_hidden_state` as numpy (SigLIP: after post-layernorm; CLIP: the last layer's output)."""
    interp = interpolate_pos_encoding
    interp = _needs_interpolation(config, pixel_values) if interp is None else interp
    return np.asarray(apply(params, config, jnp.asarray(pixel_values), interp)["last_hidden_state"])


def pooler_output(params: Any, config: VisionConfig, pixel_values: Any,
                  interpolate_pos_encoding: bool | None = None) -> np.ndarray | None:
    """HF's `pooler_output` (CLIP: post-layernormed class token; SigLIP: the pooling head, if present)."""
    interp = interpolate_pos_encoding
    interp = _needs_interpolation(config, pixel_values) if interp is None else interp
    out = apply(params, config, jnp.asarray(pixel_values), interp)["pooler_output"]
    return None if out is None else np.asarray(out)
