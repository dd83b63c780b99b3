"""`mm.attention.build_mask` against the brute-force reference of tests/helpers/mask_reference.py (the documented
rules, pair by pair): exactly equal on randomized causal / segment / bidirectional-span / key-padding / `q_offset`
cases and their combinations. The reference itself is pinned on small masks written out by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm.attention import build_mask
from tests.helpers.mask_reference import reference_mask


def _literal(rows: str) -> np.ndarray:
    return np.array([[c == "x" for c in row] for row in rows.split()], bool)[None]


def test_reference_on_hand_written_masks():
    # causal with an image span at slots 1-2: slot 1 also sees slot 2
    bid = [[0, 1, 1, 0, 0]]
    want = _literal("x.... xxx.. xxx.. xxxx. xxxxx")
    np.testing.assert_array_equal(reference_mask(1, 5, 5, causal=True, bidirectional_ids=bid), want)
    # two packed segments and a padding slot; the span id 1 recurs in segment 2 and must not join the first span
    seg, bid = [[1, 1, 2, 2, 0]], [[1, 1, 0, 1, 0]]
    want = _literal("xx... xx... ..x.. ..xx. .....")
    np.testing.assert_array_equal(
        reference_mask(1, 5, 5, causal=True, segment_ids=seg, bidirectional_ids=bid), want)
    # decoding 2 queries against 5 cache slots at offset 2, slot 0 left padding: query 0 sees slots 1-2
    want = _literal(".xx.. .xxx.")
    np.testing.assert_array_equal(
        reference_mask(1, 2, 5, causal=True, q_offset=2, kv_segment_ids=[[0, 1, 1, 1, 1]]), want)
    # non-causal (ViT-style) with key padding only: spans change nothing there
    want = _literal("xxx.. xxx..")
    np.testing.assert_array_equal(reference_mask(1, 2, 5, causal=False, kv_segment_ids=[[1, 1, 1, 0, 0]],
                                                 bidirectional_ids=[[1, 1]], kv_bidirectional_ids=[[1] * 5]), want)


def _ids(draw, b: int, n: int, hi: int) -> np.ndarray:
    """Either contiguous runs (packed sequences / image spans) or arbitrary ids, both with zeros in them."""
    if draw(st.booleans()):
        return np.asarray(draw(st.lists(st.lists(st.integers(0, hi), min_size=n, max_size=n), min_size=b,
                                        max_size=b)), np.int32).reshape(b, n)
    out = np.zeros((b, n), np.int32)
    for row in range(b):
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=6)))
        for start, stop in zip(cuts[:-1], cuts[1:]):
            out[row, start:stop] = draw(st.integers(0, hi))
    return out


@st.composite
def mask_cases(draw) -> tuple[tuple[int, int, int], dict]:
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    s = t if draw(st.booleans()) else draw(st.integers(t, 20))  # self-attention or queries against a cache
    kw: dict = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["segment_ids"] = _ids(draw, b, t, 3)
    if draw(st.booleans()) or ("segment_ids" in kw and s != t):
        kw["kv_segment_ids"] = _ids(draw, b, s, 3)  # alone: key padding (queries all in segment 1)
    if draw(st.booleans()):
        kw["bidirectional_ids"] = _ids(draw, b, t, 2)
        if s != t or draw(st.booleans()):
            kw["kv_bidirectional_ids"] = _ids(draw, b, s, 2)
    offset = draw(st.sampled_from(["none", "scalar", "per-row"]))
    if offset == "scalar":
        kw["q_offset"] = draw(st.integers(-3, s))
    elif offset == "per-row":
        kw["q_offset"] = np.asarray(draw(st.lists(st.integers(-3, s), min_size=b, max_size=b)), np.int32)
    return (b, t, s), kw


@settings(max_examples=150, deadline=None)
@given(mask_cases())
def test_build_mask_equals_brute_force(case):
    (b, t, s), kw = case
    want = reference_mask(b, t, s, **kw)
    got = build_mask(b, t, s, **{key: val if key == "causal" else jnp.asarray(val) for key, val in kw.items()})
    assert got.shape == (b, t, s) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(kw))


def test_build_mask_on_a_packed_multimodal_batch():
    """One fixed batch with every term at once (so a regression shows without hypothesis' shrinking)."""
    seg = np.array([[1] * 6 + [2] * 5 + [0] * 3, [3] * 14], np.int32)
    bid = np.zeros((2, 14), np.int32)
    bid[0, 1:4], bid[0, 7:10], bid[1, 4:12] = 1, 1, 2
    kw = dict(causal=True, segment_ids=seg, bidirectional_ids=bid, q_offset=np.array([0, 0], np.int32))
    want = reference_mask(2, 14, 14, **kw)
    assert want[0, 1, 3] and not want[0, 3, 7] and not want[0, 12].any() and want[1, 4, 11]
    got = build_mask(2, 14, 14, **{key: val if key == "causal" else jnp.asarray(val) for key, val in kw.items()})
    np.testing.assert_array_equal(np.asarray(got), want)


def test_build_mask_bad_ids_raise_like_the_kernels():
    """A kv default that cannot apply (kv length != q length) or ids of the wrong shape are a clear error, as in
    the kernels, rather than a silent broadcast (one query's id applied to every key)."""
    one = jnp.ones((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="kv_segment_ids are needed when kv length 5 != q length 1"):
        build_mask(1, 1, 5, causal=True, segment_ids=one)
    with pytest.raises(ValueError, match="kv_bidirectional_ids are needed when kv length 5 != q length 1"):
        build_mask(1, 1, 5, causal=True, bidirectional_ids=one)
    with pytest.raises(ValueError, match=r"kv_segment_ids has shape \(1, 4\), want \(1, 5\)"):
        build_mask(1, 1, 5, causal=True, kv_segment_ids=jnp.ones((1, 4), jnp.int32))
    # not causal: spans play no part, so no kv span ids are needed
    np.testing.assert_array_equal(np.asarray(build_mask(1, 1, 5, causal=False, bidirectional_ids=one)),
                                  reference_mask(1, 1, 5, causal=False, bidirectional_ids=one))
