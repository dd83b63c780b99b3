"""Flash attention for TPUs in Pallas with the Mosaic lowering: forward and backward under `jax.custom_vjp`.

Layout inside the kernels is head-major `[B, H, T, D]` (the wrapper transposes), so every tile's last two
dimensions are (sequence, head_dim) as Mosaic wants. The key-block loop is the innermost, sequential grid axis
with the online-softmax state (max, sum, accumulator) in VMEM scratch; the log-sum-exp goes to the backward
pass. `q_offset` travels as a scalar-prefetch operand in SMEM; segment/bidirectional ids as `[B, T, 1]`
(queries) and `[B, 1, S]` (keys) tiles. Grouped-query attention maps query head `h` onto kv head `h // G` in
the index maps (no repeated K/V); dK/dV accumulate over the G heads of a group and all query blocks on two
sequential grid axes. For causal attention without bidirectional spans, tiles above the diagonal are skipped
and their index maps clamped so they are not even fetched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mm_kernels.common import (
    MASK_VALUE, NN, NT, TN, dot_f32, BlockSizes, MaskArrays, MaskSpec, as_block_sizes, block_mask, normalize_inputs,
    pad_axis, padded_length, round_up)

Array = jax.Array
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_k=128)
_SUBLANES, _LANES = 8, 128


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

    @property
    def skips(self) -> bool:
        """Whether whole tiles above the causal diagonal can be skipped."""
        return self.spec.causal and not self.spec.has_bidirectional


def _split(refs: tuple, spec: MaskSpec) -> tuple[Any, Any, Any, Any, tuple]:
    it = iter(refs)
    qseg, kseg = (next(it), next(it)) if spec.has_segments else (None, None)
    qbid, kbid = (next(it), next(it)) if spec.has_bidirectional else (None, None)
    return qseg, kseg, qbid, kbid, tuple(it)


def _tile_mask(cfg: _Config, off: Array, q_start: Any, k_start: Any, bq: int, bk: int,
               qseg, kseg, qbid, kbid) -> Array:
    q_pos = q_start + off + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    spec = cfg.spec
    seg = (qseg[...], kseg[...]) if spec.has_segments else (None, None)
    bid = (qbid[...], kbid[...]) if spec.has_bidirectional else (None, None)
    return block_mask(spec, q_pos, k_pos, *seg, *bid)


def _tile_live(cfg: _Config, off: Array, q_start: Any, k_start: Any, bq: int) -> Any:
    """Whether the (query block, key block) tile can hold a visible pair (False only for skippable tiles)."""
    live = k_start < cfg.spec.kv_len
    if cfg.skips:
        live = jnp.logical_and(live, k_start <= q_start + bq - 1 + off)
    return live


def _last_k_block(cfg: _Config, off: Array, i: Any, bq: int, bk: int, j: Any) -> Any:
    """Key block to fetch at step j: past the diagonal, repeat the last live block (no new DMA)."""
    n = -(-cfg.spec.kv_len // bk)
    last = jnp.minimum(jax.lax.div(i * bq + bq - 1 + off, bk), n - 1) if cfg.skips else n - 1
    return jnp.maximum(jnp.minimum(j, last), 0)


def _first_q_block(cfg: _Config, off: Array, j: Any, bq: int, bk: int, nq: int, i: Any) -> Any:
    if not cfg.skips:
        return i
    first = jax.lax.div(jnp.maximum(j * bk - off, 0), bq)  # truncating division: Mosaic has no floor_divide
    return jnp.maximum(i, jnp.minimum(first, nq - 1))


# ------------------------------------------------------------------------------------------ forward
def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, nk: int):
    bq, bk = cfg.block_q, cfg.block_k
    qseg, kseg, qbid, kbid, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split(refs, cfg.spec)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    off = off_ref[b]
    q_start, k_start = i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_tile_live(cfg, off, q_start, k_start, bq))
    def _step():
        s = dot_f32(q_ref[...], k_ref[...], NT) * cfg.scale
        mask = _tile_mask(cfg, off, q_start, k_start, bq, bk, qseg, kseg, qbid, kbid)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scr[...] = alpha * acc_scr[...] + dot_f32(p.astype(v.dtype), v, NN)
        m_scr[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0  # fully masked rows (padding queries) give zeros
        o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _mask_inputs(spec: MaskSpec, masks: MaskArrays) -> list[Array]:
    out = []
    if spec.has_segments:
        out += [masks.q_segment_ids, masks.kv_segment_ids]
    if spec.has_bidirectional:
        out += [masks.q_bidirectional, masks.kv_bidirectional]
    return out


def _mask_specs(spec: MaskSpec, q_block: pl.BlockSpec, k_block: pl.BlockSpec) -> list[pl.BlockSpec]:
    return [q_block, k_block] * spec.has_segments + [q_block, k_block] * spec.has_bidirectional


def _params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(cfg: _Config) -> Any:
    return pltpu.InterpretParams() if cfg.interpret else False


def _forward(cfg: _Config, q: Array, k: Array, v: Array, masks: MaskArrays) -> tuple[Array, Array]:
    b, hq, tp, d = q.shape
    sp = k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q, cfg.block_k
    nq, nk = tp // bq, sp // bk
    kj = functools.partial(_last_k_block, cfg)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, off: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bi, h, i, j, off: (bi, jax.lax.div(h, g), kj(off[bi], i, bq, bk, j), 0))
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j, off: (bi, h, i, 0))
    mq = pl.BlockSpec((None, bq, 1), lambda bi, h, i, j, off: (bi, i, 0))
    mk = pl.BlockSpec((None, 1, bk), lambda bi, h, i, j, off: (bi, 0, kj(off[bi], i, bq, bk, j)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, hq, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, *_mask_specs(cfg.spec, mq, mk)],
        out_specs=[q_spec, lse_spec],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp, 1), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret(cfg), name="mm_flash_fwd_tpu",
    )(masks.q_offset, q, k, v, *_mask_inputs(cfg.spec, masks))


# ----------------------------------------------------------------------------------------- backward
def _dkdv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, nq: int):
    bq, bk, groups = cfg.block_q_bwd, cfg.block_k_bwd, cfg.groups
    qseg, kseg, qbid, kbid, (dk_ref, dv_ref, dk_scr, dv_scr) = _split(refs, cfg.spec)
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    off = off_ref[b]
    q_start, k_start = i * bq, j * bk

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_tile_live(cfg, off, q_start, k_start, bq))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _tile_mask(cfg, off, q_start, k_start, bq, bk, qseg, kseg, qbid, kbid)
        s = dot_f32(q, k, NT) * cfg.scale
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dv_scr[...] += dot_f32(p.astype(do.dtype), do, TN)
        ds = p * (dot_f32(do, v, NT) - delta_ref[...])
        dk_scr[...] += dot_f32(ds.astype(q.dtype), q, TN)

    @pl.when(jnp.logical_and(g == groups - 1, i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, nk: int):
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    qseg, kseg, qbid, kbid, (dq_ref, dq_scr) = _split(refs, cfg.spec)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    off = off_ref[b]
    q_start, k_start = i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_tile_live(cfg, off, q_start, k_start, bq))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        mask = _tile_mask(cfg, off, q_start, k_start, bq, bk, qseg, kseg, qbid, kbid)
        s = dot_f32(q, k, NT) * cfg.scale
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        ds = p * (dot_f32(do, v, NT) - delta_ref[...])
        dq_scr[...] += dot_f32(ds.astype(k.dtype), k, NN)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _backward(cfg: _Config, q, k, v, masks: MaskArrays, o, lse, do) -> tuple[Array, Array, Array]:
    b, hq, tp, d = q.shape
    hkv, sp = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = tp // bq, sp // bk
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    mask_in = _mask_inputs(cfg.spec, masks)

    # dK, dV: grid (batch, kv head, key block, group member, query block); the last two accumulate.
    qi = functools.partial(_first_q_block, cfg)
    q_spec = pl.BlockSpec((None, None, bq, d),
                          lambda bi, h, j, gi, i, off: (bi, h * g + gi, qi(off[bi], j, bq, bk, nq, i), 0))
    st_spec = pl.BlockSpec((None, None, bq, 1),
                           lambda bi, h, j, gi, i, off: (bi, h * g + gi, qi(off[bi], j, bq, bk, nq, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, h, j, gi, i, off: (bi, h, j, 0))
    mq = pl.BlockSpec((None, bq, 1), lambda bi, h, j, gi, i, off: (bi, qi(off[bi], j, bq, bk, nq, i), 0))
    mk = pl.BlockSpec((None, 1, bk), lambda bi, h, j, gi, i, off: (bi, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, hkv, nk, g, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec, *_mask_specs(cfg.spec, mq, mk)],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=_interpret(cfg), name="mm_flash_dkdv_tpu",
    )(masks.q_offset, q, k, v, do, lse, delta, *mask_in)

    # dQ: grid (batch, query head, query block, key block); the last accumulates.
    kj = functools.partial(_last_k_block, cfg)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, h, i, j, off: (bi, h, i, 0))
    st_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, h, i, j, off: (bi, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda bi, h, i, j, off: (bi, jax.lax.div(h, g), kj(off[bi], i, bq, bk, j), 0))
    mq = pl.BlockSpec((None, bq, 1), lambda bi, h, i, j, off: (bi, i, 0))
    mk = pl.BlockSpec((None, 1, bk), lambda bi, h, i, j, off: (bi, 0, kj(off[bi], i, bq, bk, j)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, hq, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, st_spec, st_spec, *_mask_specs(cfg.spec, mq, mk)],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret(cfg), name="mm_flash_dq_tpu",
    )(masks.q_offset, q, k, v, do, lse, delta, *mask_in)
    return dq, dk, dv


# --------------------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q: Array, k: Array, v: Array, masks: MaskArrays) -> Array:
    return _forward(cfg, q, k, v, masks)[0]


def _flash_fwd(cfg, q, k, v, masks):
    o, lse = _forward(cfg, q, k, v, masks)
    return o, (q, k, v, masks, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, masks, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, masks, o, lse, do)
    return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tile(block: int, length: int, multiple: int, name: str) -> int:
    if block <= 0 or block % multiple:
        raise ValueError(f"flash_attention_tpu: {name} must be a positive multiple of {multiple}, got {block}")
    return min(block, round_up(length, multiple))


def flash_attention_tpu(
    q: Array, k: Array, v: Array, *, causal: bool = True, segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None, q_offset: Array | int | None = None,
    bidirectional_ids: Array | None = None, kv_bidirectional_ids: Array | None = None,
    scale: float | None = None, block_sizes: Any = None, interpret: bool = False, **unused: Any,
) -> Array:
    """Fused attention on TPU; arguments and mask semantics as `mm.attention.attention`.

    q `[B, T, Hq, D]`, k/v `[B, S, Hkv, D]`; returns `[B, T, Hq, D]` in q's dtype (fp32 accumulation).
    Query blocks are multiples of 8, key blocks of 128. `interpret=True` runs the TPU interpreter on CPU.
    """
    spec, masks = normalize_inputs(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
        bidirectional_ids=bidirectional_ids, kv_bidirectional_ids=kv_bidirectional_ids)
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    blocks = as_block_sizes(block_sizes, DEFAULT_BLOCK_SIZES)
    bq, bq_b = (_tile(x, t, _SUBLANES, "block_q") for x in (blocks.block_q, blocks.bwd[0]))
    bk, bk_b = (_tile(x, s, _LANES, "block_k") for x in (blocks.block_k, blocks.bwd[1]))
    tp, sp = padded_length(t, bq, bq_b), padded_length(s, bk, bk_b)
    cfg = _Config(spec=spec, scale=float(d**-0.5 if scale is None else scale), groups=hq // hkv,
                  block_q=bq, block_k=bk, block_q_bwd=bq_b, block_k_bwd=bk_b, interpret=bool(interpret))

    def heads_major(x: Array, length: int) -> Array:
        return pad_axis(x, 1, length).transpose(0, 2, 1, 3)

    def q_ids(x: Array | None) -> Array | None:
        return None if x is None else pad_axis(x, 1, tp)[:, :, None]

    def kv_ids(x: Array | None) -> Array | None:
        return None if x is None else pad_axis(x, 1, sp)[:, None, :]

    padded = MaskArrays(
        q_offset=masks.q_offset,
        q_segment_ids=q_ids(masks.q_segment_ids), kv_segment_ids=kv_ids(masks.kv_segment_ids),
        q_bidirectional=q_ids(masks.q_bidirectional), kv_bidirectional=kv_ids(masks.kv_bidirectional))
    out = _flash(cfg, heads_major(q, tp), heads_major(k, sp), heads_major(v, sp), padded)
    return out.transpose(0, 2, 1, 3)[:, :t]
