"""Pallas flash attention (GPU/Triton and TPU/Mosaic kernels, run in interpret mode on CPU) against the float32
XLA reference `mm.attention.xla_attention`: output and dQ/dK/dV over mask kinds, GQA ratios, odd lengths,
head dims and dtypes. Also checks that both kernels lower for their real backend (Triton IR / Mosaic MLIR)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm.attention import xla_attention
from mm_kernels import BlockSizes, flash_attention_gpu, flash_attention_tpu

KERNELS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}
# Interpret mode compiles big while-loop nests; these XLA:CPU options cut compile time ~5x for the tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(b: int, t: int, s: int, hq: int, hkv: int, d: int, dtype: Any, seed: int = 0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32).astype(dtype)
    # unit-variance cotangent in fp32; half that in bf16 so the bf16 rounding of O(5) gradients stays < 2e-2
    scale = 1.0 if dtype == jnp.float32 else 0.5
    do = scale * jax.random.normal(kd, (b, t, hq, d), jnp.float32)
    return q, k, v, do


def _masks(kind: str, b: int, t: int, s: int) -> dict[str, Any]:
    """Mask keyword arguments for `attention` by name; ids include padding (0) and several segments/spans."""
    out: dict[str, Any] = {"causal": "causal" in kind}
    if "segments" in kind:
        seg = np.ones((b, t), np.int32)
        seg[:, t // 3:] = 2
        seg[0, -4:] = 0  # right padding: rows and keys that see nothing
        out["segment_ids"] = jnp.asarray(seg)
    if "bidir" in kind:
        bid = np.zeros((b, t), np.int32)
        bid[:, 2:11] = 1  # an image span at the start
        bid[-1, t // 2:t // 2 + 6] = 2  # a second one, later, in the last row only
        out["bidirectional_ids"] = jnp.asarray(bid)
    if "keypad" in kind:
        kseg = np.ones((b, s), np.int32)
        kseg[0, -7:] = 0  # padded cache slots of batch row 0
        out["segment_ids"] = jnp.ones((b, t), jnp.int32)
        out["kv_segment_ids"] = jnp.asarray(kseg)
    if "offset" in kind:
        out["q_offset"] = jnp.asarray([s - t - 7, s - t], jnp.int32)[:b]
    return out


def _fwd_bwd(fn, q, k, v, do, mask_kw, causal):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, causal=causal, **mask_kw), q, k, v)
    return (out, *vjp(do.astype(out.dtype)))


def _errors(backend: str, b, t, s, hq, hkv, d, dtype, kind, block_sizes=None) -> list[float]:
    q, k, v, do = _inputs(b, t, s, hq, hkv, d, dtype)
    mask_kw = _masks(kind, b, t, s)
    causal = mask_kw.pop("causal")
    kernel = KERNELS[backend]

    def run(q, k, v, do, mask_kw):
        fn = lambda *a, **kw: kernel(*a, interpret=True, block_sizes=block_sizes, **kw)  # noqa: E731
        return _fwd_bwd(fn, q, k, v, do, mask_kw, causal)

    got = jax.jit(run).lower(q, k, v, do, mask_kw).compile(FAST_COMPILE)(q, k, v, do, mask_kw)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = jax.jit(lambda *a: _fwd_bwd(xla_attention, *a, causal))(f32(q), f32(k), f32(v), do, mask_kw)
    for name, g in zip(("out", "dq", "dk", "dv"), got):
        assert g.dtype == dtype, (name, g.dtype)
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name
    return [float(jnp.max(jnp.abs(f32(g) - w))) for g, w in zip(got, want)]


# (batch, q len, kv len, q heads, kv heads, head dim, dtype, mask kind, block sizes {backend: ...})
CASES = [
    pytest.param(2, 37, 37, 4, 2, 64, jnp.float32, "causal", None, id="causal-gqa2-odd-d64-f32"),
    pytest.param(2, 37, 37, 2, 2, 64, jnp.float32, "causal-segments-bidir", None, id="packed-image-spans-mha-f32"),
    pytest.param(2, 5, 40, 4, 1, 64, jnp.float32, "causal-offset-keypad", None, id="decode-offset-keypad-gqa4"),
    pytest.param(2, 37, 37, 2, 2, 80, jnp.float32, "bidirectional-segments", None, id="vit-segments-d80-f32"),
    pytest.param(2, 37, 37, 4, 2, 96, jnp.bfloat16, "causal-segments-bidir", None, id="packed-gqa2-d96-bf16"),
    pytest.param(1, 150, 150, 6, 2, 128, jnp.bfloat16, "causal", {"gpu": (32, 64), "tpu": (32, 128)},
                 id="multiblock-gqa3-d128-bf16"),
    pytest.param(1, 130, 130, 6, 2, 64, jnp.float32, "causal-segments",
                 {"gpu": BlockSizes(32, 16, 16, 32), "tpu": BlockSizes(32, 128, 16, 128)},
                 id="multiblock-skip-gqa3-bwdblocks-f32"),
]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("b,t,s,hq,hkv,d,dtype,kind,blocks", CASES)
def test_matches_float32_reference(backend, b, t, s, hq, hkv, d, dtype, kind, blocks):
    errs = _errors(backend, b, t, s, hq, hkv, d, dtype, kind, None if blocks is None else blocks[backend])
    tol = TOL[dtype]
    assert max(errs) <= tol, dict(zip(("out", "dq", "dk", "dv"), errs))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["causal", "causal-segments-bidir", "bidirectional-segments"])
def test_matches_reference_larger(backend, dtype, kind):
    errs = _errors(backend, 2, 300, 300, 8, 2, 128, dtype, kind)
    assert max(errs) <= TOL[dtype], dict(zip(("out", "dq", "dk", "dv"), errs))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    """Padding queries (segment 0) see nothing: zero output, no gradient flowing from them, nothing NaN."""
    q, k, v, _ = _inputs(1, 20, 20, 2, 1, 64, jnp.float32)
    seg = jnp.asarray([[1] * 12 + [0] * 8], jnp.int32)
    kernel = KERNELS[backend]

    def run(q, k, v):
        f = lambda q, k, v: kernel(q, k, v, causal=True, segment_ids=seg, interpret=True)  # noqa: E731
        out = f(q, k, v)
        return out, jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

    out, (dq, dk, dv) = jax.jit(run).lower(q, k, v).compile(FAST_COMPILE)(q, k, v)
    assert float(jnp.max(jnp.abs(out[:, 12:]))) == 0.0 and float(jnp.max(jnp.abs(out[:, :12]))) > 0.0
    assert float(jnp.max(jnp.abs(dq[:, 12:]))) == 0.0
    assert float(jnp.max(jnp.abs(dk[:, 12:]))) == 0.0 and float(jnp.max(jnp.abs(dv[:, 12:]))) == 0.0
    assert float(jnp.max(jnp.abs(dk[:, :12]))) > 0.0


@pytest.mark.parametrize("backend,platform,call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                    ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_real_backend(backend, platform, call):
    """Cross-lowering from CPU runs the Pallas->Triton / Pallas->Mosaic lowering (block-shape rules and op
    support); only the device compiler itself is left untested without hardware."""
    q = jax.ShapeDtypeStruct((2, 300, 14, 80), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 2, 80), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def f(q, k, v, ids):
        out, vjp = jax.vjp(lambda q, k, v: KERNELS[backend](
            q, k, v, segment_ids=ids, bidirectional_ids=ids, q_offset=jnp.zeros((2,), jnp.int32)), q, k, v)
        return out, vjp(out)

    text = jax.jit(f).trace(q, k, k, ids).lower(lowering_platforms=(platform,)).as_text()
    assert len(re.findall(re.escape(call), text)) >= 3  # forward, dK/dV, dQ kernels


@pytest.mark.parametrize("backend,bad", [("gpu", (48, 64)), ("gpu", (8, 64)), ("tpu", (12, 128)), ("tpu", (64, 96))])
def test_bad_block_sizes_raise(backend, bad):
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="block"):
        KERNELS[backend](q, k, v, block_sizes=bad, interpret=True)


def test_bad_shapes_raise():
    q, k, v, _ = _inputs(1, 8, 8, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention_gpu(q, k, v, interpret=True)
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        flash_attention_tpu(q, k, v, segment_ids=jnp.ones((1, 9), jnp.int32), interpret=True)
