"""The one attention function every model calls, and the mask semantics all implementations share.

Shapes: q `[B, T, Hq, D]`, k/v `[B, S, Hkv, D]`, `Hq % Hkv == 0` (grouped-query attention: K/V heads are
never repeated in memory; query heads are grouped onto them). Output `[B, T, Hq, D]` in q's dtype,
computed with float32 softmax statistics.

Masking (all optional, combined with AND, except the bidirectional span which is OR-ed into the causal part):
- `causal`: query at slot `i` sees keys at slots `j <= i + q_offset` (`q_offset` [B] or scalar, default 0;
  decoding against a KV cache passes the cache index).
- `segment_ids` `[B, T]` / `kv_segment_ids` `[B, S]` (default: `segment_ids`): a query sees only keys of its
  own segment; segment id 0 marks padding, which sees and is seen by nothing (its output rows are zero).
- `bidirectional_ids` `[B, T]` / `kv_bidirectional_ids` `[B, S]`: tokens sharing a non-zero id (an image
  span) see each other in both directions, inside an otherwise causal sequence (prefix-LM style).

`implementation=None` picks the Pallas kernel for the backend (GPU / TPU) and XLA elsewhere; "xla",
"cudnn", "pallas_gpu", "pallas_tpu" force one. `interpret=True` runs the Pallas kernels on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("xla", "cudnn", "pallas_gpu", "pallas_tpu")

# Registered by kernels: name -> callable with the signature of `attention` minus `implementation`.
_KERNELS: dict[str, Callable[..., Array]] = {}


def register_implementation(name: str, fn: Callable[..., Array]) -> None:
    """Makes a kernel selectable by `implementation=name` (kernels register themselves on import)."""
    _KERNELS[name] = fn


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
    """Pallas on GPU/TPU when its kernel is available, XLA otherwise."""
    backend = jax.default_backend()
    if backend == "gpu" and "pallas_gpu" in _available():
        return "pallas_gpu"
    if backend == "tpu" and "pallas_tpu" in _available():
        return "pallas_tpu"
    return "xla"


def _available() -> dict[str, Callable[..., Array]]:
    if not _KERNELS:
        try:  # kernels register themselves; optional so that jax-only installs still attend via XLA
            import mm_kernels  # noqa: F401
        except ImportError:
            pass
    return {"xla": xla_attention, **_KERNELS}


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
    """Dispatches to the chosen implementation; see the module docstring for shapes and masks."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants [B, T, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    name = implementation or default_implementation()
    impls = _available()
    if name not in impls:
        raise ValueError(f"attention implementation {name!r} is not available; have {sorted(impls)}")
    return impls[name](
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
        bidirectional_ids=bidirectional_ids, kv_bidirectional_ids=kv_bidirectional_ids, scale=scale,
        interpret=interpret, block_sizes=block_sizes,
    )
