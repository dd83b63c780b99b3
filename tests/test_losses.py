"""Chunked cross-entropy equals the plain full-logits loss in value and gradients, and never forms
`[tokens, vocab]` float32 arrays in its compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm.losses import chunked_cross_entropy, plain_cross_entropy


def _data(n=50, d=32, v=300, dtype=jnp.float32, seed=0):
    kh, kw, kl, kx = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    kernel = (0.2 * jax.random.normal(kw, (d, v), jnp.float32)).astype(dtype)
    labels = jax.random.randint(kl, (n,), 0, v)
    labels = labels.at[::7].set(-100)  # ignored positions
    weights = jax.random.uniform(kx, (n,), minval=0.5, maxval=2.0)
    return hidden, kernel, labels, weights


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("chunk", [16, 50, 64])  # ragged last chunk, exact, larger than N
def test_equals_plain_loss_and_grads(reduction, use_weights, chunk):
    hidden, kernel, labels, weights = _data()
    w = weights if use_weights else None

    def vg(fn, **kw):
        return jax.jit(jax.value_and_grad(lambda h, k: fn(h, k, labels, w, reduction=reduction, **kw),
                                          argnums=(0, 1)))(hidden, kernel)

    (lc, (dhc, dkc)), (lp, (dhp, dkp)) = vg(chunked_cross_entropy, chunk_size=chunk), vg(plain_cross_entropy)
    np.testing.assert_allclose(lc, lp, rtol=1e-6)
    np.testing.assert_allclose(dhc, dhp, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(dkc, dkp, atol=1e-6, rtol=1e-5)


def test_count_and_ignore_index():
    hidden, kernel, labels, weights = _data()
    loss, count = chunked_cross_entropy(hidden, kernel, labels, weights, return_count=True, chunk_size=16)
    keep = np.asarray(labels) != -100
    np.testing.assert_allclose(count, np.asarray(weights)[keep].sum(), rtol=1e-6)
    # the analytic value from numpy float64
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
    nll = -logp[np.arange(len(labels)), np.where(keep, labels, 0)]
    want = (nll * np.asarray(weights) * keep).sum() / (np.asarray(weights) * keep).sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_bf16_matches_plain_bf16():
    hidden, kernel, labels, _ = _data(dtype=jnp.bfloat16)
    vg = lambda fn, **kw: jax.value_and_grad(lambda h, k: fn(h, k, labels, **kw), argnums=(0, 1))(hidden, kernel)  # noqa: E731
    (lc, gc), (lp, gp) = vg(chunked_cross_entropy, chunk_size=16), vg(plain_cross_entropy)
    np.testing.assert_allclose(lc, lp, rtol=1e-5)
    for a, b in zip(gc, gp):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3)


def test_no_full_logits_in_compiled_program():
    n, d, v, chunk = 512, 16, 4096, 64
    hidden, kernel, labels, _ = _data(n, d, v)
    f = jax.jit(jax.grad(lambda h, k: chunked_cross_entropy(h, k, labels, chunk_size=chunk), argnums=(0, 1)))
    text = f.lower(hidden, kernel).compile().as_text()
    assert f"f32[{n},{v}]" not in text and f"f32[{chunk},{v}]" in text


def test_bad_inputs_raise():
    hidden, kernel, labels, _ = _data()
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, kernel, labels[:-1])
    with pytest.raises(ValueError, match="kernel"):
        chunked_cross_entropy(hidden, kernel.T, labels)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hidden, kernel, labels, reduction="avg")


@pytest.mark.parametrize("vocab", [300, 307])  # 300: vocab slices of 60; 307 (prime): padded slices of 64
def test_vocab_sliced_backward(monkeypatch, vocab):
    import mm.losses as losses

    monkeypatch.setattr(losses, "_VOCAB_CHUNK", 64)
    hidden, kernel, labels, weights = _data(v=vocab)
    labels = labels.at[3].set(vocab - 1)  # a label in the last (padded) slice
    def vg(fn, **kw):
        return jax.value_and_grad(lambda h, k: fn(h, k, labels, weights, **kw), argnums=(0, 1))(hidden, kernel)
    (lc, gc), (lp, gp) = vg(chunked_cross_entropy, chunk_size=16), vg(plain_cross_entropy)
    np.testing.assert_allclose(lc, lp, rtol=1e-6)
    for a, b in zip(gc, gp):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [16, 64])
def test_per_token_equals_plain_and_grads(chunk):
    hidden, kernel, labels, weights = _data()
    cot = jax.random.normal(jax.random.key(3), labels.shape)  # a non-uniform cotangent per token

    def vg(fn, **kw):
        f = lambda h, k: fn(h, k, labels, weights, reduction="none", **kw)  # noqa: E731
        out, pull = jax.vjp(f, hidden, kernel)
        return out, pull(cot)

    (nc, (dhc, dkc)), (np_, (dhp, dkp)) = vg(chunked_cross_entropy, chunk_size=chunk), vg(plain_cross_entropy)
    assert nc.shape == labels.shape
    np.testing.assert_allclose(nc, np_, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(nc)[np.asarray(labels) == -100] == 0)
    np.testing.assert_allclose(dhc, dhp, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(dkc, dkp, atol=1e-6, rtol=1e-5)


def test_completion_logprobs_per_row_against_numpy():
    from mm.losses import completion_logprobs, next_token_targets

    b, t, d, v = 3, 9, 16, 40
    kh, kw, ki = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(kh, (b, t, d))
    kernel = 0.3 * jax.random.normal(kw, (d, v))
    ids = jax.random.randint(ki, (b, t), 0, v)
    cmask = np.zeros((b, t), np.int32)
    cmask[0, 4:] = 1
    cmask[1, 2:6] = 1  # right padding after the completion
    cmask[2, 8:] = 1  # a single completion token
    labels, mask = next_token_targets(ids, jnp.asarray(cmask))
    logps, count = completion_logprobs(hidden, kernel, labels, mask, chunk_size=5)
    # brute force in float64: token s (s >= 1, in the completion) is scored by position s - 1
    h64, k64, ids_np = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64), np.asarray(ids)
    logits = h64 @ k64
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = [sum(logp[r, s - 1, ids_np[r, s]] for s in range(1, t) if cmask[r, s]) for r in range(b)]
    np.testing.assert_allclose(logps, want, rtol=1e-5)
    np.testing.assert_array_equal(count, cmask[:, 1:].sum(1))
    with pytest.raises(ValueError, match="completion_logprobs"):
        completion_logprobs(hidden[0], kernel, labels, mask)
