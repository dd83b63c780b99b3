"""Flash attention for GPUs in Pallas with the Triton lowering: forward and backward under `jax.custom_vjp`.

Layout stays `[B, T, H, D]` (no transposes): each program owns one (batch, query head, query block) and walks
the key blocks with an online softmax, saving the log-sum-exp for the backward pass. Grouped-query attention
maps query head `h` onto kv head `h // G` in the BlockSpecs, so K/V are never repeated. The backward pass runs
two kernels: dK/dV per (batch, kv head, key block), looping over the G query heads of the group and the query
blocks, and dQ per (batch, query head, query block). Triton wants power-of-two tiles: head dims are zero-padded
to a power of two (80/96 -> 128), sequences to whole blocks. Causal attention without bidirectional spans skips
the key blocks above the diagonal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from mm_kernels.common import (
    MASK_VALUE, NN, NT, TN, dot_f32, BlockSizes, MaskArrays, MaskSpec, as_block_sizes, block_mask, next_pow2,
    normalize_inputs, pad_axis, padded_length)

Array = jax.Array
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=64, block_k=64)
_MIN_BLOCK = 16  # tl.dot needs at least 16 along every dimension


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: MaskSpec
    scale: float
    groups: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool
    num_warps: int
    num_stages: int


def _split(refs: tuple, spec: MaskSpec) -> tuple[Any, Any, Any, Any, Any, tuple]:
    """Unpacks (qpos, qseg, kseg, qbid, kbid) refs present for this mask; the rest are outputs."""
    it = iter(refs)
    qpos = next(it) if spec.causal else None
    qseg, kseg = (next(it), next(it)) if spec.has_segments else (None, None)
    qbid, kbid = (next(it), next(it)) if spec.has_bidirectional else (None, None)
    return qpos, qseg, kseg, qbid, kbid, tuple(it)


def _tile_mask(spec: MaskSpec, q_pos, k_start, bk, q_seg, kseg_ref, q_bid, kbid_ref) -> Array:
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    ks = pl.ds(k_start, bk)
    k_seg = kseg_ref[ks][None, :] if spec.has_segments else None
    k_bid = kbid_ref[ks][None, :] if spec.has_bidirectional else None
    return block_mask(spec, q_pos, k_pos, q_seg, k_seg, q_bid, k_bid)


def _query_side(spec: MaskSpec, qpos, qseg, qbid, sl: Any = slice(None)) -> tuple[Any, Any, Any]:
    q_pos = qpos[sl][:, None] if spec.causal else None
    q_seg = qseg[sl][:, None] if spec.has_segments else None
    q_bid = qbid[sl][:, None] if spec.has_bidirectional else None
    return q_pos, q_seg, q_bid


def _kv_block_range(cfg: _Config, q_pos: Array | None, bk: int) -> tuple[Any, Any]:
    """Key blocks [0, upper) that can hold a visible key for this query block."""
    n = -(-cfg.spec.kv_len // bk)
    if cfg.spec.causal and not cfg.spec.has_bidirectional:
        upper = jnp.max(q_pos) // bk + 1
        return 0, jnp.clip(upper, 0, n)
    return 0, n


# ------------------------------------------------------------------------------------------ forward
def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config):
    spec, bq, bk = cfg.spec, cfg.block_q, cfg.block_k
    qpos, qseg, kseg, qbid, kbid, (o_ref, lse_ref) = _split(refs, spec)
    q = q_ref[...]
    q_pos, q_seg, q_bid = _query_side(spec, qpos, qseg, qbid)

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot_f32(q, k, NT) * cfg.scale
        mask = _tile_mask(spec, q_pos, start, bk, q_seg, kseg, q_bid, kbid)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_f32(p.astype(v.dtype), v, NN)
        return m_new, l, acc

    lo, hi = _kv_block_range(cfg, q_pos, bk)
    m0 = jnp.full((bq,), MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
    acc0 = jnp.zeros(q.shape, jnp.float32)
    m, l, acc = jax.lax.fori_loop(lo, hi, body, (m0, l0, acc0))
    empty = l == 0.0  # fully masked rows (padding queries) give zeros
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))


def _mask_inputs(spec: MaskSpec, qpos, masks: MaskArrays) -> list[Array]:
    out = [qpos] if spec.causal else []
    if spec.has_segments:
        out += [masks.q_segment_ids, masks.kv_segment_ids]
    if spec.has_bidirectional:
        out += [masks.q_bidirectional, masks.kv_bidirectional]
    return out


def _mask_specs(spec: MaskSpec, q_block: pl.BlockSpec, k_block: pl.BlockSpec) -> list[pl.BlockSpec]:
    return ([q_block] if spec.causal else []) + [q_block, k_block] * spec.has_segments \
        + [q_block, k_block] * spec.has_bidirectional


def _params(cfg: _Config) -> pltr.CompilerParams:
    return pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(cfg: _Config, q: Array, k: Array, v: Array, qpos: Array, masks: MaskArrays) -> tuple[Array, Array]:
    b, tp, hq, d = q.shape
    sp = k.shape[1]
    g, bq = cfg.groups, cfg.block_q
    grid = (b, hq, tp // bq)
    q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0))
    kv_spec = pl.BlockSpec((None, sp, None, d), lambda bi, h, i: (bi, 0, h // g, 0))
    mq = pl.BlockSpec((None, bq), lambda bi, h, i: (bi, i))
    mk = pl.BlockSpec((None, sp), lambda bi, h, i: (bi, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, *_mask_specs(cfg.spec, mq, mk)],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        interpret=cfg.interpret, compiler_params=_params(cfg), name="mm_flash_fwd_gpu",
    )(q, k, v, *_mask_inputs(cfg.spec, qpos, masks))


# ----------------------------------------------------------------------------------------- backward
def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    """One key block of one kv head: accumulates over the G query heads of its group and all query blocks."""
    spec, bq, bk = cfg.spec, cfg.block_q_bwd, cfg.block_k_bwd
    qpos, qseg, kseg, qbid, kbid, (dk_ref, dv_ref) = _split(refs, spec)
    j = pl.program_id(2)
    k_start = j * bk
    k = k_ref[...]
    v = v_ref[...]
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = kseg[...][None, :] if spec.has_segments else None
    k_bid = kbid[...][None, :] if spec.has_bidirectional else None
    nq = q_ref.shape[0] // bq
    lo = 0
    if spec.causal and not spec.has_bidirectional:  # query blocks wholly before this key block see none of it
        lo = jnp.clip((k_start - jnp.min(qpos[...])) // bq, 0, nq)

    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(cfg.groups):
        def body(i, carry, g=g):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            rows = pl.ds(start, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            lse = lse_ref[g, rows]
            delta = delta_ref[g, rows]
            q_pos, q_seg, q_bid = _query_side(spec, qpos, qseg, qbid, rows)
            mask = block_mask(spec, q_pos, k_pos, q_seg, k_seg, q_bid, k_bid)
            s = dot_f32(q, k, NT) * cfg.scale
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            dv = dv + dot_f32(p.astype(do.dtype), do, TN)
            dp = dot_f32(do, v, NT)
            ds = p * (dp - delta[:, None])
            dk = dk + dot_f32(ds.astype(q.dtype), q, TN)
            return dk, dv

        dk, dv = jax.lax.fori_loop(lo, nq, body, (dk, dv))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    spec, bk = cfg.spec, cfg.block_k_bwd
    qpos, qseg, kseg, qbid, kbid, (dq_ref,) = _split(refs, spec)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_pos, q_seg, q_bid = _query_side(spec, qpos, qseg, qbid)

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        mask = _tile_mask(spec, q_pos, start, bk, q_seg, kseg, q_bid, kbid)
        s = dot_f32(q, k, NT) * cfg.scale
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        ds = p * (dot_f32(do, v, NT) - delta)
        return dq + dot_f32(ds.astype(k.dtype), k, NN)

    lo, hi = _kv_block_range(cfg, q_pos, bk)
    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, qpos, masks: MaskArrays, o, lse, do) -> tuple[Array, Array, Array]:
    b, tp, hq, d = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    mask_in = _mask_inputs(cfg.spec, qpos, masks)

    # dK, dV: grid over (batch, kv head, key block)
    group_q = pl.BlockSpec((None, tp, g, d), lambda bi, h, j: (bi, 0, h, 0))
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda bi, h, j: (bi, j, h, 0))
    group_stats = pl.BlockSpec((None, g, tp), lambda bi, h, j: (bi, h, 0))
    mq = pl.BlockSpec((None, tp), lambda bi, h, j: (bi, 0))
    mk = pl.BlockSpec((None, bk), lambda bi, h, j: (bi, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(b, hkv, sp // bk),
        in_specs=[group_q, kv_blk, kv_blk, group_q, group_stats, group_stats, *_mask_specs(cfg.spec, mq, mk)],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret, compiler_params=_params(cfg), name="mm_flash_dkdv_gpu",
    )(q, k, v, do, lse, delta, *mask_in)

    # dQ: grid over (batch, query head, query block)
    q_blk = pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0))
    kv_all = pl.BlockSpec((None, sp, None, d), lambda bi, h, i: (bi, 0, h // g, 0))
    stats = pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i))
    mq = pl.BlockSpec((None, bq), lambda bi, h, i: (bi, i))
    mk = pl.BlockSpec((None, sp), lambda bi, h, i: (bi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, hq, tp // bq),
        in_specs=[q_blk, kv_all, kv_all, q_blk, stats, stats, *_mask_specs(cfg.spec, mq, mk)],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret, compiler_params=_params(cfg), name="mm_flash_dq_gpu",
    )(q, k, v, do, lse, delta, *mask_in)
    return dq, dk, dv


# --------------------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q: Array, k: Array, v: Array, qpos: Array, masks: MaskArrays) -> Array:
    return _forward(cfg, q, k, v, qpos, masks)[0]


def _flash_fwd(cfg, q, k, v, qpos, masks):
    o, lse = _forward(cfg, q, k, v, qpos, masks)
    return o, (q, k, v, qpos, masks, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, qpos, masks, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, qpos, masks, o, lse, do)
    return dq, dk, dv, None, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)

jax.tree_util.register_dataclass(
    MaskArrays, data_fields=["q_offset", "q_segment_ids", "kv_segment_ids", "q_bidirectional",
                             "kv_bidirectional"], meta_fields=[])


def _tile(block: int, length: int) -> int:
    if block < _MIN_BLOCK or block & (block - 1):
        raise ValueError(f"flash_attention_gpu: block sizes must be powers of two >= {_MIN_BLOCK}, got {block}")
    return min(block, max(_MIN_BLOCK, next_pow2(length)))


def flash_attention_gpu(
    q: Array, k: Array, v: Array, *, causal: bool = True, segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None, q_offset: Array | int | None = None,
    bidirectional_ids: Array | None = None, kv_bidirectional_ids: Array | None = None,
    scale: float | None = None, block_sizes: Any = None, interpret: bool = False,
    num_warps: int | None = None, num_stages: int = 2, **unused: Any,
) -> Array:
    """Fused attention on GPU; arguments and mask semantics as `mm.attention.attention`.

    q `[B, T, Hq, D]`, k/v `[B, S, Hkv, D]`; returns `[B, T, Hq, D]` in q's dtype (fp32 accumulation).
    `interpret=True` runs the kernel through the Pallas interpreter (CPU tests).
    """
    spec, masks = normalize_inputs(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
        bidirectional_ids=bidirectional_ids, kv_bidirectional_ids=kv_bidirectional_ids)
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    blocks = as_block_sizes(block_sizes, DEFAULT_BLOCK_SIZES)
    bq, bk = _tile(blocks.block_q, t), _tile(blocks.block_k, s)
    bq_b, bk_b = _tile(blocks.bwd[0], t), _tile(blocks.bwd[1], s)
    tp, sp = padded_length(t, bq, bq_b), padded_length(s, bk, bk_b)
    dp = max(_MIN_BLOCK, next_pow2(d))
    cfg = _Config(spec=spec, scale=float(d**-0.5 if scale is None else scale), groups=hq // hkv,
                  block_q=bq, block_k=bk, block_q_bwd=bq_b, block_k_bwd=bk_b, interpret=bool(interpret),
                  num_warps=num_warps or (4 if dp <= 64 else 8), num_stages=num_stages)
    qp = pad_axis(pad_axis(q, 1, tp), 3, dp)
    kp = pad_axis(pad_axis(k, 1, sp), 3, dp)
    vp = pad_axis(pad_axis(v, 1, sp), 3, dp)
    qpos = jnp.arange(tp, dtype=jnp.int32)[None, :] + masks.q_offset[:, None]
    padded = MaskArrays(
        q_offset=masks.q_offset,
        q_segment_ids=None if masks.q_segment_ids is None else pad_axis(masks.q_segment_ids, 1, tp),
        kv_segment_ids=None if masks.kv_segment_ids is None else pad_axis(masks.kv_segment_ids, 1, sp),
        q_bidirectional=None if masks.q_bidirectional is None else pad_axis(masks.q_bidirectional, 1, tp),
        kv_bidirectional=None if masks.kv_bidirectional is None else pad_axis(masks.kv_bidirectional, 1, sp),
    )
    out = _flash(cfg, qp, kp, vp, qpos, padded)
    return out[:, :t, :, :d]
