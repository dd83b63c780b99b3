"""What the GPU and TPU flash-attention kernels share: block sizes, input normalisation and padding, the
in-block mask, and the custom-VJP-friendly calling convention.

The mask semantics are those of `mm.attention.build_mask` (this package depends on jax only, so it restates
them rather than importing mm): causal with a per-batch `q_offset`, segment ids with 0 = padding, bidirectional
spans OR-ed into the causal part, plus key slots beyond the real length (block padding) masked out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# Masked scores use a large finite value (not -inf) so that no inf - inf can appear; probabilities of
# masked entries are zeroed explicitly, which also makes fully masked rows produce zeros.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along queries (`block_q`) and keys (`block_k`); the backward pass may use its own.

    Kernels shrink a block to the (padded) sequence when the sequence is shorter than the block.
    """

    block_q: int
    block_k: int
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None

    @property
    def bwd(self) -> tuple[int, int]:
        return (self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k)


def as_block_sizes(value: Any, default: BlockSizes) -> BlockSizes:
    """`None` -> backend default; a `BlockSizes`, a mapping of its fields or a `(block_q, block_k)` pair."""
    if value is None:
        return default
    if isinstance(value, BlockSizes):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in dataclasses.fields(BlockSizes)}
        if unknown:
            raise ValueError(f"block_sizes: unknown keys {sorted(unknown)}")
        return dataclasses.replace(default, **dict(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return BlockSizes(int(value[0]), int(value[1]))
    raise ValueError(f"block_sizes: want BlockSizes, a mapping or (block_q, block_k), got {value!r}")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of which mask terms are present (hashable: it parametrises the kernels)."""

    causal: bool
    has_segments: bool
    has_bidirectional: bool
    kv_len: int  # real number of keys; slots at or beyond it are block padding


@dataclasses.dataclass
class MaskArrays:
    """Per-token int32 vectors the kernels read; absent terms are None. Shapes `[B, T]` / `[B, S]`."""

    q_offset: Array  # [B]
    q_segment_ids: Array | None
    kv_segment_ids: Array | None
    q_bidirectional: Array | None
    kv_bidirectional: Array | None


def normalize_inputs(q: Array, k: Array, v: Array, *, causal: bool, segment_ids: Array | None,
                     kv_segment_ids: Array | None, q_offset: Array | int | None,
                     bidirectional_ids: Array | None, kv_bidirectional_ids: Array | None,
                     ) -> tuple[MaskSpec, MaskArrays]:
    """Checks shapes and resolves the defaults of `build_mask` into explicit per-token arrays."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash attention wants [B, T, H, D] inputs, got q{q.shape} k{k.shape} v{v.shape}")
    b, t, hq, d = q.shape
    _, s, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash attention: k{k.shape} / v{v.shape} do not match q{q.shape}")
    if hq % hkv:
        raise ValueError(f"flash attention: query heads {hq} are not a multiple of kv heads {hkv}")

    def ids(x: Array | None, length: int, name: str) -> Array | None:
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.shape != (b, length):
            raise ValueError(f"flash attention: {name} has shape {x.shape}, want {(b, length)}")
        return x.astype(jnp.int32)

    qs, ks = ids(segment_ids, t, "segment_ids"), ids(kv_segment_ids, s, "kv_segment_ids")
    if qs is not None or ks is not None:
        if qs is None:
            qs = jnp.ones((b, t), jnp.int32)
        if ks is None:
            if s != t:
                raise ValueError(f"flash attention: kv_segment_ids are needed when kv length {s} != q length {t}")
            ks = qs
    qb = kb = None
    if causal and bidirectional_ids is not None:
        qb = ids(bidirectional_ids, t, "bidirectional_ids")
        kb = ids(kv_bidirectional_ids, s, "kv_bidirectional_ids")
        if kb is None:
            if s != t:
                raise ValueError(
                    f"flash attention: kv_bidirectional_ids are needed when kv length {s} != q length {t}")
            kb = qb
    off = jnp.zeros((b,), jnp.int32) if q_offset is None else jnp.broadcast_to(
        jnp.asarray(q_offset, jnp.int32), (b,))
    spec = MaskSpec(causal=causal, has_segments=qs is not None, has_bidirectional=qb is not None, kv_len=s)
    return spec, MaskArrays(off, qs, ks, qb, kb)


def block_mask(spec: MaskSpec, q_pos: Array, k_pos: Array, q_seg: Array | None, k_seg: Array | None,
               q_bid: Array | None, k_bid: Array | None) -> Array:
    """Boolean `[bq, bk]` mask for one tile. Position/id arguments broadcast as `[bq, 1]` vs `[1, bk]`.

    `q_pos` is the causal position of each query (slot + q_offset) and `k_pos` the key slot.
    """
    mask = k_pos < spec.kv_len
    if spec.causal:
        visible = k_pos <= q_pos
        if spec.has_bidirectional:
            visible = visible | ((q_bid == k_bid) & (q_bid != 0))
        mask = mask & visible
    if spec.has_segments:
        mask = mask & (q_seg == k_seg) & (k_seg != 0)
    return mask


# dot_general dimension numbers for 2-D tiles.
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def dot_f32(a: Array, b: Array, dims: Any) -> Array:
    """A tile matmul with float32 accumulation, whatever the input dtype."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def pad_axis(x: Array, axis: int, length: int, value: Any = 0) -> Array:
    """Pads `x` along `axis` up to `length` with `value` (no-op when already that long)."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def padded_length(length: int, *blocks: int) -> int:
    """Smallest multiple of every block size that holds `length`."""
    return round_up(length, math.lcm(*blocks))
