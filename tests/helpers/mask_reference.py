"""Brute-force reference for the attention mask semantics of `mm/attention.py`'s docstring, written from the
documented rules alone (no mm code): one Python decision per (query, key) pair, and a float64 numpy softmax
attention (output and gradients) on top of it.

The rules, as documented:
- causal: query slot `i` sees key slot `j` when `j <= i + q_offset[b]` ...
- ... or (bidirectional spans, OR-ed into the causal part only) when both carry the same non-zero span id;
- segments (when `segment_ids` or `kv_segment_ids` is given; a missing `segment_ids` puts every query in
  segment 1, a missing `kv_segment_ids` defaults to `segment_ids`): same segment, and segment 0 (padding)
  sees and is seen by nothing;
- all of these are AND-ed; a query that sees no key gives a zero output row.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _row(x: Any, b: int) -> list[int] | None:
    return None if x is None else [int(v) for v in np.asarray(x)[b]]


def reference_mask(batch: int, q_len: int, kv_len: int, *, causal: bool, segment_ids: Any = None,
                   kv_segment_ids: Any = None, q_offset: Any = None, bidirectional_ids: Any = None,
                   kv_bidirectional_ids: Any = None) -> np.ndarray:
    """Boolean `[B, T, S]`: True where query slot `i` may attend to key slot `j`, decided pair by pair."""
    offsets = np.broadcast_to(np.asarray(0 if q_offset is None else q_offset, np.int64), (batch,))
    has_segments = segment_ids is not None or kv_segment_ids is not None
    out = np.zeros((batch, q_len, kv_len), bool)
    for b in range(batch):
        q_seg, kv_seg = _row(segment_ids, b), _row(kv_segment_ids, b)
        q_bid, kv_bid = _row(bidirectional_ids, b), _row(kv_bidirectional_ids, b)
        if kv_seg is None:
            kv_seg = q_seg
        if kv_bid is None:
            kv_bid = q_bid
        for i in range(q_len):
            for j in range(kv_len):
                allowed = True
                if causal:
                    sees_past = j <= i + int(offsets[b])
                    same_span = q_bid is not None and q_bid[i] != 0 and q_bid[i] == kv_bid[j]
                    allowed = sees_past or same_span
                if has_segments:
                    qs = 1 if q_seg is None else q_seg[i]
                    ks = kv_seg[j]
                    if qs == 0 or ks == 0 or qs != ks:
                        allowed = False
                out[b, i, j] = allowed
    return out


def reference_attention(q: Any, k: Any, v: Any, mask: np.ndarray, do: Any = None,
                        scale: float | None = None) -> Any:
    """Softmax attention in float64 over `mask` `[B, T, S]`: out `[B, T, Hq, D]`, and with a cotangent `do`
    also (dq, dk, dv). Query head `h` reads kv head `h // (Hq // Hkv)`; a row with no visible key is zero."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    out = np.zeros_like(q)
    grads = (np.zeros_like(q), np.zeros_like(k), np.zeros_like(v))
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, :, h // group], v[bi, :, h // group]
            scores = q[bi, :, h] @ kh.T * scale
            p = np.zeros_like(scores)
            for i in range(t):
                seen = mask[bi, i]
                if seen.any():
                    e = np.exp(scores[i, seen] - scores[i, seen].max())
                    p[i, seen] = e / e.sum()
            out[bi, :, h] = p @ vh
            if do is not None:
                g = np.asarray(do, np.float64)[bi, :, h]
                dp = g @ vh.T
                ds = p * (dp - (g * out[bi, :, h]).sum(-1, keepdims=True))
                grads[0][bi, :, h] = ds @ kh * scale
                grads[1][bi, :, h // group] += ds.T @ q[bi, :, h] * scale
                grads[2][bi, :, h // group] += p.T @ g
    return out if do is None else (out, *grads)
