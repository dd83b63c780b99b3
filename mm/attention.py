"""The one attention function every model calls, and the mask semantics all implementations share.

Shapes: q `[B, T, Hq, D]`, k/v `[B, S, Hkv, D]`, `Hq % Hkv == 0` (grouped-query attention: K/V heads are
never repeated in memory; query heads are grouped onto them). Output `[B, T, Hq, D]` in q's dtype,
computed with float32 softmax statistics.

Masking (all optional, combined with AND, except the bidirectional span which is OR-ed into the causal part):
- `causal`: query at slot `i` sees keys at slots `j <= i + q_offset` (`q_offset` [B] or scalar, default 0;
  decoding against a KV cache passes the cache index).
- `segment_ids` `[B, T]` / `kv_segment_ids` `[B, S]` (default: `segment_ids`): a query sees only keys of its
  own segment; segment id 0 marks padding, which sees and is seen by nothing. Without `segment_ids` every
  query is in segment 1, so `kv_segment_ids` alone is a key-padding mask (1 = key, 0 = padding).
- `bidirectional_ids` `[B, T]` / `kv_bidirectional_ids` `[B, S]` (default: `bidirectional_ids`): tokens
  sharing a non-zero id (an image span) see each other in both directions, inside an otherwise causal
  sequence (prefix-LM style).
- A kv default taken from the query side needs `S == T`; otherwise pass the kv array (a ValueError says so).
- A query that sees no key at all (padding, or only padded keys) gets a zero output row.

`implementation=None` picks the Pallas kernel for the backend (GPU / TPU) and XLA elsewhere; "xla",
"cudnn", "pallas_gpu", "pallas_tpu" force one. `interpret=True` runs the Pallas kernels on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("xla", "cudnn", "pallas_gpu", "pallas_tpu")
_PALLAS = ("pallas_gpu", "pallas_tpu")


def build_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_offset: Array | int | None = None,
    bidirectional_ids: Array | None = None,
    kv_bidirectional_ids: Array | None = None,
) -> Array:
    """Boolean mask `[B, T, S]`, True where a query may attend to a key. The reference for every kernel."""
    for name, ids, length in (("segment_ids", segment_ids, q_len), ("kv_segment_ids", kv_segment_ids, kv_len),
                              ("bidirectional_ids", bidirectional_ids, q_len),
                              ("kv_bidirectional_ids", kv_bidirectional_ids, kv_len)):
        if ids is not None and tuple(ids.shape) != (batch, length):
            raise ValueError(f"attention mask: {name} has shape {tuple(ids.shape)}, want {(batch, length)}")
    for name, q_side, kv_side, used in (("kv_segment_ids", segment_ids, kv_segment_ids, True),
                                        ("kv_bidirectional_ids", bidirectional_ids, kv_bidirectional_ids, causal)):
        if used and q_side is not None and kv_side is None and kv_len != q_len:
            raise ValueError(f"attention mask: {name} are needed when kv length {kv_len} != q length {q_len}")
    mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
    if causal:
        off = jnp.zeros((batch,), jnp.int32) if q_offset is None else jnp.broadcast_to(
            jnp.asarray(q_offset, jnp.int32), (batch,))
        qi = jnp.arange(q_len, dtype=jnp.int32)[None, :, None] + off[:, None, None]
        kj = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
        causal_mask = kj <= qi
        if bidirectional_ids is not None:
            kvb = bidirectional_ids if kv_bidirectional_ids is None else kv_bidirectional_ids
            same_span = (bidirectional_ids[:, :, None] == kvb[:, None, :]) & (bidirectional_ids[:, :, None] != 0)
            causal_mask = causal_mask | same_span
        mask = mask & causal_mask
    if segment_ids is not None or kv_segment_ids is not None:
        qs = segment_ids if segment_ids is not None else jnp.ones((batch, q_len), jnp.int32)
        ks = kv_segment_ids if kv_segment_ids is not None else qs
        mask = mask & (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    return mask


def xla_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_offset: Array | int | None = None,
    bidirectional_ids: Array | None = None,
    kv_bidirectional_ids: Array | None = None,
    scale: float | None = None,
    **unused: Any,
) -> Array:
    """Plain XLA attention: materialises `[B, Hkv, G, T, S]` scores in float32. Reference and CPU path."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = build_mask(
        b, t, s, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
        bidirectional_ids=bidirectional_ids, kv_bidirectional_ids=kv_bidirectional_ids,
    )
    big_neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, None, None], scores, big_neg)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)  # fully masked rows -> 0
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def default_implementation() -> str:
    """Pallas on GPU/TPU, XLA elsewhere (CPU)."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    if backend == "tpu":
        return "pallas_tpu"
    return "xla"


def _pallas_gpu(q: Array, k: Array, v: Array, **kw: Any) -> Array:
    from mm_kernels import flash_attention_gpu  # imported on use: Pallas import is slow and CPU runs skip it

    return flash_attention_gpu(q, k, v, **kw)


def _pallas_tpu(q: Array, k: Array, v: Array, **kw: Any) -> Array:
    from mm_kernels import flash_attention_tpu

    return flash_attention_tpu(q, k, v, **kw)


def cudnn_attention(q: Array, k: Array, v: Array, *, causal: bool = True, segment_ids: Array | None = None,
                    kv_segment_ids: Array | None = None, q_offset: Array | int | None = None,
                    bidirectional_ids: Array | None = None, kv_bidirectional_ids: Array | None = None,
                    scale: float | None = None, sdpa_implementation: str = "cudnn", **unused: Any) -> Array:
    """cuDNN fused attention through `jax.nn.dot_product_attention`.

    Plain causal attention uses cuDNN's built-in causal mask; any other mask is passed as a boolean
    `[B, 1, T, S]` mask from `build_mask` (cuDNN turns it into a bias, so that path is O(T*S) in memory).
    Rows with no visible key are zeroed, as in every other implementation. `sdpa_implementation` exists
    so CPU tests can check the mask plumbing through jax's XLA implementation of the same call.
    """
    if sdpa_implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention needs bfloat16/float16 inputs, got {q.dtype}")
    b, t, _, _ = q.shape
    s = k.shape[1]
    plain_causal = causal and q_offset is None and t == s and all(
        x is None for x in (segment_ids, kv_segment_ids, bidirectional_ids))
    if plain_causal or (not causal and segment_ids is None and kv_segment_ids is None):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=sdpa_implementation)
    mask = build_mask(b, t, s, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                      q_offset=q_offset, bidirectional_ids=bidirectional_ids,
                      kv_bidirectional_ids=kv_bidirectional_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                       implementation=sdpa_implementation)
    visible = mask.any(-1)[:, :, None, None]
    return jnp.where(visible, out, jnp.zeros((), out.dtype))


_IMPLS: dict[str, Callable[..., Array]] = {
    "xla": xla_attention, "cudnn": cudnn_attention, "pallas_gpu": _pallas_gpu, "pallas_tpu": _pallas_tpu}


def _auto_shard_specs(q: Array, k: Array) -> tuple[Any, Any, Any] | None:
    """PartitionSpecs for running a kernel per shard under the ambient mesh, or None when not needed.

    Under `jax.jit` with a mesh set (`jax.set_mesh`), a Pallas/cuDNN custom call would otherwise be
    gathered onto every device; instead it runs inside `shard_map` with batch over (data, fsdp) and heads
    over tensor (each only when it divides). Inside a user's `shard_map` (all axes manual) nothing is done.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes, n = [], 1
    for ax in ("data", "fsdp"):
        if sizes.get(ax, 1) > 1 and q.shape[0] % (n * sizes[ax]) == 0:
            batch_axes.append(ax)
            n *= sizes[ax]
    tp = sizes.get("tensor", 1)
    head_axis = "tensor" if tp > 1 and q.shape[2] % tp == 0 and k.shape[2] % tp == 0 else None
    if not batch_axes and head_axis is None:
        return None
    batch = tuple(batch_axes) if batch_axes else None
    P = jax.sharding.PartitionSpec
    return P(batch, None, head_axis, None), P(batch, None), P(batch)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_offset: Array | int | None = None,
    bidirectional_ids: Array | None = None,
    kv_bidirectional_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: Any = None,
) -> Array:
    """Dispatches to the chosen implementation; see the module docstring for shapes and masks.

    Pallas kernels and cuDNN called under a mesh (`jax.set_mesh`) run per shard via `shard_map`
    (batch over data/fsdp, heads over tensor); inside a user's `shard_map` they run as called.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants [B, T, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    name = implementation or default_implementation()
    if name not in _IMPLS:
        raise ValueError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
    fn = _IMPLS[name]
    kw: dict[str, Any] = dict(causal=causal, scale=scale)
    if name in _PALLAS:
        kw.update(interpret=interpret, block_sizes=block_sizes)
    arrays = dict(segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bidirectional_ids=bidirectional_ids,
                  kv_bidirectional_ids=kv_bidirectional_ids)
    arrays = {key: jnp.asarray(val) for key, val in arrays.items() if val is not None}
    if q_offset is not None:
        arrays["q_offset"] = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],))
    specs = _auto_shard_specs(q, k) if name != "xla" else None
    if specs is None:
        return fn(q, k, v, **kw, **arrays)
    qkv_spec, tok_spec, off_spec = specs
    arr_specs = {key: off_spec if key == "q_offset" else tok_spec for key in arrays}

    def per_shard(q: Array, k: Array, v: Array, arrays: dict[str, Array]) -> Array:
        return fn(q, k, v, **kw, **arrays)

    return jax.shard_map(per_shard, in_specs=(qkv_spec, qkv_spec, qkv_spec, arr_specs), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, arrays)
