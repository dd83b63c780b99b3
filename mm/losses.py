"""Cross-entropy over a large vocabulary without materialising `[tokens, vocab]` logits.

`chunked_cross_entropy` takes the final hidden states `[N, D]` and the LM-head kernel `[D, V]` and walks the
tokens in chunks: the forward keeps only each token's log-sum-exp, the backward (a `jax.custom_vjp`)
recomputes logits one `[chunk, <=8192]` tile at a time (vocab slices outside, token chunks inside) to
accumulate dH and finish dW slice by slice. Peak extra memory is one chunk's `[chunk, V]` float32 logits
(forward), a float32 dH and the dW being written, instead of all `[N, V]` logits and their gradient.
`plain_cross_entropy`
is the straightforward version: the reference in tests and the baseline in `bench/attention.py`. Both, and
`cross_entropy` over logits a model already made, score tokens by the one `token_nll`.

`reduction="none"` keeps the NLL per token; `completion_logprobs` builds on it for per-row summed log-probs of
`[B, T]` rows (what preference losses score, see `mm.dpo_losses`), with `next_token_targets` for the causal shift.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
IGNORE_INDEX = -100
_VOCAB_CHUNK = 8192  # backward: dW is finished per [D, 8192] slice


def _token_weights(labels: Array, weights: Array | None, ignore_index: int) -> Array:
    w = (labels != ignore_index).astype(jnp.float32)
    return w if weights is None else w * weights.astype(jnp.float32)


def _check(hidden: Array, kernel: Array, labels: Array, weights: Array | None) -> None:
    if hidden.ndim != 2 or kernel.ndim != 2 or hidden.shape[1] != kernel.shape[0]:
        raise ValueError(f"cross-entropy wants hidden [N, D] and kernel [D, V], got {hidden.shape} and {kernel.shape}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"cross-entropy: labels {labels.shape} do not match hidden states {hidden.shape}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"cross-entropy: weights {weights.shape} do not match labels {labels.shape}")


REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross-entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(nll: Array, w: Array, reduction: str, return_count: bool):
    """`nll` and `w` per token `[N]` (`nll` already weighted). 'none' keeps them per token."""
    if reduction == "none":
        loss, count = nll, w
    else:
        loss, count = jnp.sum(nll), jnp.sum(w)
        loss = loss / jnp.maximum(count, 1e-9) if reduction == "mean" else loss
    return (loss, count) if return_count else loss


def token_nll(logits: Array, labels: Array) -> Array:
    """Per-token NLL (float32) `logsumexp(logits) - logits[label]` over the last axis; negative labels score
    label 0 (give them zero weight)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def cross_entropy(logits: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
    """(Sum of token NLL over `mask`, the mask's sum), float32, from materialised logits `[..., V]`."""
    return jnp.sum(token_nll(logits, labels) * mask), jnp.sum(mask)


def plain_cross_entropy(hidden: Array, kernel: Array, labels: Array, weights: Array | None = None, *,
                        ignore_index: int = IGNORE_INDEX, reduction: str = "mean", return_count: bool = False):
    """Reference: full float32 logits `[N, V]`, log-softmax, weighted sum (or mean over the weight sum, or per
    token)."""
    _check(hidden, kernel, labels, weights)
    _check_reduction(reduction)
    w = _token_weights(labels, weights, ignore_index)
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    nll = token_nll(logits, jnp.where(labels == ignore_index, 0, labels))
    return _reduce(nll * w, w, reduction, return_count)


def _chunk_logits(h: Array, kernel: Array) -> Array:
    return jnp.dot(h, kernel, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll(hidden: Array, kernel: Array, labels: Array, w: Array, chunk: int) -> Array:
    """Per-token `w * NLL` `[N]` (N a multiple of `chunk`)."""
    return _nll_fwd(hidden, kernel, labels, w, chunk)[0]


def _nll_fwd(hidden, kernel, labels, w, chunk):
    n_chunks = hidden.shape[0] // chunk

    def body(carry, xs):
        h, y, wc = xs
        logits = _chunk_logits(h, kernel)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return carry, ((lse - picked) * wc, lse)

    xs = (hidden.reshape(n_chunks, chunk, -1), labels.reshape(n_chunks, chunk), w.reshape(n_chunks, chunk))
    _, (nll, lse) = jax.lax.scan(body, None, xs)
    return nll.reshape(-1), (hidden, kernel, labels, w, lse)


def _nll_bwd(chunk, res, g):
    """Vocab chunks outside, token chunks inside: each `[D, vocab_chunk]` slice of dW is finished in a small
    float32 accumulator and written once, so no `[D, V]` float32 accumulator is carried; dH accumulates in
    float32 `[N, D]` (hidden-sized)."""
    hidden, kernel, labels, w, lse = res
    n_chunks, vocab = hidden.shape[0] // chunk, kernel.shape[1]
    vc = _vocab_chunk(vocab)
    n_v = -(-vocab // vc)
    kernel_p = jnp.pad(kernel, ((0, 0), (0, n_v * vc - vocab))) if n_v * vc != vocab else kernel
    xs = (hidden.reshape(n_chunks, chunk, -1), labels.reshape(n_chunks, chunk),
          (w * g).reshape(n_chunks, chunk), lse)  # g: the per-token cotangent

    def vocab_step(carry, j):
        dh, dw = carry
        w_j = jax.lax.dynamic_slice_in_dim(kernel_p, j * vc, vc, axis=1)
        cols = j * vc + jax.lax.broadcasted_iota(jnp.int32, (chunk, vc), 1)

        def token_step(dw_j, x):
            h, y, wg, lse_c = x
            p = jnp.where(cols < vocab, jnp.exp(_chunk_logits(h, w_j) - lse_c[:, None]), 0.0)
            dlogits = (p - (cols == y[:, None])) * wg[:, None]
            dh_c = jax.lax.dot_general(dlogits.astype(kernel.dtype), w_j, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            dw_j = dw_j + jnp.dot(h.T, dlogits.astype(h.dtype), preferred_element_type=jnp.float32)
            return dw_j, dh_c

        dw_j, dh_j = jax.lax.scan(token_step, jnp.zeros((kernel.shape[0], vc), jnp.float32), xs)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_j.astype(kernel.dtype), j * vc, axis=1)
        return (dh + dh_j.reshape(dh.shape), dw), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(kernel_p.shape, kernel.dtype))
    (dh, dw), _ = jax.lax.scan(vocab_step, init, jnp.arange(n_v))
    return dh.astype(hidden.dtype), dw[:, :vocab], None, jnp.zeros_like(w)


def _vocab_chunk(vocab: int) -> int:
    """Largest divisor of `vocab` in [_VOCAB_CHUNK / 8, _VOCAB_CHUNK] (no padded copy of the kernel), else
    `_VOCAB_CHUNK` with padding."""
    if vocab <= _VOCAB_CHUNK:
        return vocab
    for vc in range(_VOCAB_CHUNK, _VOCAB_CHUNK // 8 - 1, -1):
        if vocab % vc == 0:
            return vc
    return _VOCAB_CHUNK


_weighted_nll.defvjp(_nll_fwd, _nll_bwd)


def chunked_cross_entropy(hidden: Array, kernel: Array, labels: Array, weights: Array | None = None, *,
                          ignore_index: int = IGNORE_INDEX, reduction: str = "mean", return_count: bool = False,
                          chunk_size: int = 512):
    """Token-level cross-entropy of `softmax(hidden @ kernel)` against `labels`, chunked over tokens.

    hidden `[N, D]`, kernel `[D, V]`, labels `[N]` (entries equal to `ignore_index` are skipped), optional
    per-token `weights` `[N]` (not differentiated). Returns the weighted sum, the mean (over the summed weights)
    or, with `reduction="none"`, the weighted NLL of each token `[N]` (0 where ignored); with `return_count`
    also the weight sum (per token for 'none'). Equals `plain_cross_entropy` in value and gradients; logits
    are formed in float32 one `[chunk_size, V]` block at a time, in the forward and again in the backward.
    """
    _check(hidden, kernel, labels, weights)
    _check_reduction(reduction)
    if chunk_size <= 0:
        raise ValueError(f"cross-entropy: chunk_size must be positive, got {chunk_size}")
    n = hidden.shape[0]
    chunk = min(chunk_size, max(n, 1))
    padded = -(-n // chunk) * chunk
    w = _token_weights(labels, weights, ignore_index)
    safe = jnp.where(labels == ignore_index, 0, labels).astype(jnp.int32)
    if padded != n:  # padding tokens carry weight 0
        hidden = jnp.pad(hidden, ((0, padded - n), (0, 0)))
        safe = jnp.pad(safe, (0, padded - n))
        w_in = jnp.pad(w, (0, padded - n))
    else:
        w_in = w
    nll = _weighted_nll(hidden, kernel, safe, jax.lax.stop_gradient(w_in), chunk)[:n]
    return _reduce(nll, w, reduction, return_count)


def next_token_targets(input_ids: Array, completion_mask: Array) -> tuple[Array, Array]:
    """Causal shift for scoring `[B, T]` token rows: position t predicts token t + 1, so the labels are
    `input_ids[:, 1:]` and the mask `completion_mask[:, 1:]`, each padded with one unscored last column (hidden
    states stay `[B, T, D]`; the first token is never scored)."""
    if input_ids.shape != completion_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"next_token_targets: input_ids {input_ids.shape} and completion_mask "
                         f"{completion_mask.shape} must be the same [B, T]")
    labels = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    mask = jnp.pad(completion_mask[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    return labels, mask


def completion_logprobs(hidden: Array, kernel: Array, labels: Array, mask: Array, *,
                        chunk_size: int = 512) -> tuple[Array, Array]:
    """Per-row summed log-prob of the `mask`ed `labels` and the row's token count, both float32 `[B]`.

    hidden `[B, T, D]` (the final-normed states), kernel `[D, V]` (the LM head), labels `[B, T]` (the token each
    position predicts, e.g. from `next_token_targets`), mask `[B, T]` (1 = scored). Log-probs come from float32
    logits through `chunked_cross_entropy`, so `[B * T, V]` logits are never formed; differentiable in hidden
    and kernel."""
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2] or mask.shape != labels.shape:
        raise ValueError(f"completion_logprobs: hidden [B, T, D], labels and mask [B, T] wanted, got "
                         f"{hidden.shape}, {labels.shape}, {mask.shape}")
    b, t, d = hidden.shape
    nll, w = chunked_cross_entropy(hidden.reshape(b * t, d), kernel, labels.reshape(-1), mask.reshape(-1),
                                   reduction="none", return_count=True, chunk_size=chunk_size)
    return -jnp.sum(nll.reshape(b, t), axis=1), jnp.sum(w.reshape(b, t), axis=1)
