"""Both Pallas flash-attention kernels (interpret mode on CPU) against the brute-force mask reference of
tests/helpers/mask_reference.py and a float64 numpy softmax attention: output and dQ/dK/dV in float32 within 1e-5,
with image spans that cross the kernels' query and key block boundaries (where block skipping or a per-tile
mask could go wrong), packed segments, padding queries, key padding with `q_offset` and rows that see nothing."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_kernels import BlockSizes, flash_attention_gpu, flash_attention_tpu
from tests.helpers.mask_reference import reference_attention, reference_mask

KERNELS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}
# Interpret mode compiles big while-loop nests; these XLA:CPU options cut compile time a lot.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Small tiles so spans cross them: GPU tiles are powers of two >= 16; TPU key tiles are multiples of 128.
BLOCKS = {"gpu": BlockSizes(16, 16, 16, 32), "tpu": BlockSizes(16, 128, 16, 128)}
BOUNDARY = 128  # a key-block boundary of both kernels' tilings (and a query-block boundary too)


def _packed() -> tuple[tuple[int, int], dict[str, Any]]:
    """Two packed rows of 160 tokens with image spans across block boundaries (128, and 16/32 for queries)."""
    t = 160
    seg = np.zeros((2, t), np.int32)
    seg[0, :70], seg[0, 70:150] = 1, 2  # row 0 ends in 10 padding slots
    seg[1, :100], seg[1, 100:] = 1, 3
    bid = np.zeros((2, t), np.int32)
    bid[0, 10:38] = 1  # crosses query/key blocks at 16 and 32
    bid[0, 120:141] = 1  # same id again, in segment 2: must stay separate from the first span
    bid[1, 90:110] = 1  # crosses the segment boundary at 100: segments still cut it
    bid[1, 124:134] = 2
    return (t, t), dict(causal=True, segment_ids=seg, bidirectional_ids=bid)


def _prefill_with_cache() -> tuple[tuple[int, int], dict[str, Any]]:
    """24 queries against a 160-slot cache at per-row offsets: left-padded keys, an image span that began
    before this chunk and crosses key block 128 (its first queries' tile ends before 128, so a kernel that skipped
    tiles above the diagonal would miss the span's later keys), and in row 1 queries whose only past keys are
    padding."""
    t, s = 24, 160
    off = np.array([112, 3], np.int32)
    kseg = np.ones((2, s), np.int32)
    kseg[0, :5] = 0  # left padding
    kseg[0, 136:] = 0  # cache slots not written yet
    kseg[1, :10] = 0  # queries at positions 3..9 see only these: zero rows
    kbid = np.zeros((2, s), np.int32)
    kbid[0, 118:136] = 3
    kbid[1, 20:30] = 4
    qbid = np.stack([kbid[r, off[r]:off[r] + t] for r in range(2)])  # a query's span id is its position's
    return (t, s), dict(causal=True, q_offset=off, kv_segment_ids=kseg, bidirectional_ids=qbid,
                        kv_bidirectional_ids=kbid)


def _vit_packed() -> tuple[tuple[int, int], dict[str, Any]]:
    """Non-causal packed images (ViT-style) with segments crossing blocks and trailing padding."""
    t = 40
    seg = np.zeros((2, t), np.int32)
    seg[0, :13], seg[0, 13:35] = 1, 2
    seg[1, :] = 5
    return (t, t), dict(causal=False, segment_ids=seg)


def _unmasked_ragged() -> tuple[tuple[int, int], dict[str, Any]]:
    """No mask terms at all and 40 keys, not a whole number of key blocks: only the kernels' own block padding
    is masked (the padded keys are zeros, which would still take softmax weight if they were let in)."""
    return (20, 40), dict(causal=False)


# name: (inputs, query heads, kv heads)
CASES = {"packed-spans": (_packed, 2, 1), "prefill-cache": (_prefill_with_cache, 4, 2), "vit": (_vit_packed, 2, 2),
         "unmasked-ragged": (_unmasked_ragged, 2, 1)}
SPANS = ("packed-spans", "prefill-cache")  # cases built so that an image span crosses key block BOUNDARY


def _run(backend: str, case: str):
    make, hq, hkv = CASES[case]
    (t, s), kw = make()
    b, d = 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
               ((b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)))
    do = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    mask = reference_mask(b, t, s, **kw)
    arrays = {key: jnp.asarray(val) for key, val in kw.items() if key != "causal"}

    def fwd_bwd(q, k, v, do, arrays):
        fn = lambda q, k, v: KERNELS[backend](q, k, v, causal=kw["causal"], interpret=True,  # noqa: E731
                                              block_sizes=BLOCKS[backend], **arrays)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(do))

    got = jax.jit(fwd_bwd).lower(q, k, v, do, arrays).compile(FAST_COMPILE)(q, k, v, do, arrays)
    return kw, mask, got, reference_attention(q, k, v, mask, do)


def _span_only_pairs(mask: np.ndarray, offsets: Any, boundary: int) -> bool:
    """Whether some visible pair has its key past the query's causal position and across `boundary`."""
    offsets = np.broadcast_to(np.asarray(0 if offsets is None else offsets), (mask.shape[0],))
    bi, i, j = np.nonzero(mask)
    pos = i + offsets[bi]
    return bool(np.any((j > pos) & (pos < boundary) & (j >= boundary)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_matches_brute_force(backend, case):
    kw, mask, got, want = _run(backend, case)
    if case in SPANS:  # the point of these cases: spans reach keys past the diagonal in the next key block
        assert _span_only_pairs(mask, kw.get("q_offset"), BOUNDARY)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32, name
        err = float(np.max(np.abs(np.asarray(g, np.float64) - w)))
        assert err <= 1e-5, (name, err)
    empty = ~mask.any(-1)  # queries that see no key: padding, or only padded keys before them
    assert empty.any() == (case != "unmasked-ragged")
    assert not np.asarray(got[0])[empty].any() and not np.asarray(got[1])[empty].any()
