"""Batched KV-cache decoding and sampling, compiled once per shape bucket.

A decoder plugs in through two pure functions (see `DecodeFns`): `prefill` runs the (left-padded) prompt
and fills the cache, `step` feeds one token per row. Everything else is shared by every model and workflow:
left-padding and positions, the `lax.while_loop` over steps, greedy / temperature / top-k / top-p sampling
(all traced values, so changing them never recompiles), stop tokens, and shape buckets for prompt length and
new-token count so a serving loop compiles a handful of programs, not one per request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# `extra` inputs aligned with prompt tokens (given per row, unpadded); they are left-padded with the prompts.
TOKEN_ALIGNED_EXTRA = {"image_mask"}


@dataclasses.dataclass(frozen=True)
class DecodeFns:
    """How to run one decoder.

    `prefill(params, input_ids, positions, segment_ids, kv_segment_ids, cache) -> (last_logits [B, V], cache)`
    `step(params, token [B, 1], positions [B, 1], kv_segment_ids [B, S], cache, cache_index) -> (logits [B, V], cache)`
    `init_cache(batch, max_len) -> cache`. `extra` (e.g. image features) is passed to prefill as keyword arguments.
    """

    prefill: Callable[..., tuple[Array, Any]]
    step: Callable[..., tuple[Array, Any]]
    init_cache: Callable[[int, int], Any]


def decode_fns(apply: Callable[..., tuple[Array, Any]], init_cache: Callable[[int, int], Any]) -> DecodeFns:
    """The prefill / step pair of any decoder, from its one forward function
    `apply(params, ids, positions, *, segment_ids, kv_segment_ids, cache, cache_index, **extra) -> (logits, cache)`
    (`extra`: what prefill gets beside the prompt, e.g. `pixel_values`, `image_mask`) and its cache maker."""

    def prefill(params: Any, ids: Array, positions: Array, mask: Array, kv_mask: Array, cache: Any,
                **extra: Any) -> tuple[Array, Any]:
        logits, cache = apply(params, ids, positions, segment_ids=mask, kv_segment_ids=kv_mask, cache=cache,
                              cache_index=0, **extra)
        return logits[:, -1], cache

    def step(params: Any, tok: Array, positions: Array, kv_mask: Array, cache: Any, index: Array
             ) -> tuple[Array, Any]:
        logits, cache = apply(params, tok, positions, segment_ids=jnp.ones(tok.shape, jnp.int32),
                              kv_segment_ids=kv_mask, cache=cache, cache_index=index)
        return logits[:, -1], cache

    return DecodeFns(prefill=prefill, step=step, init_cache=init_cache)


def bucket(n: int, minimum: int = 16) -> int:
    """Shape bucket: the next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads ragged token lists to `length`: ids and a 0/1 attention mask, both `[B, length]` int32."""
    b = len(sequences)
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if len(s) > length:
            raise ValueError(f"generate: prompt {i} has {len(s)} tokens, more than {length}")
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: Array) -> Array:
    """Positions for a left-padded batch: 0 at each row's first real token (HF's cumsum(mask) - 1)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def sample(logits: Array, rng: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """One token per row. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    v = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p over what top-k kept: drop tokens once the mass before them reaches top_p (always keep the first).
    probs_sorted = jax.nn.softmax(jnp.where(sorted_desc < kth, -jnp.inf, sorted_desc), axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep_sorted = mass_before < top_p
    n_keep = jnp.maximum(keep_sorted.sum(-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _decode(fns: DecodeFns, params: Any, input_ids: Array, mask: Array, rng: Array, temperature: Array,
            top_k: Array, top_p: Array, stop_tokens: Array, max_new_tokens: Array, pad_id: Array,
            *, buffer_len: int, extra: dict[str, Any]) -> tuple[Array, Array]:
    b, t = input_ids.shape
    total = t + buffer_len
    cache = fns.init_cache(b, total)
    positions = positions_from_mask(mask)
    kv_mask = jnp.concatenate([mask, jnp.ones((b, buffer_len), jnp.int32)], axis=1)
    logits, cache = fns.prefill(params, input_ids, positions, mask, kv_mask, cache, **extra)
    last_pos = positions[:, -1]

    def is_stop(tok: Array) -> Array:
        return (tok[:, None] == stop_tokens[None, :]).any(-1)

    rng, sub = jax.random.split(rng)
    tok = sample(logits, sub, temperature, top_k, top_p)
    out = jnp.full((b, buffer_len), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_stop(tok)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state: tuple) -> Array:
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~done.all()

    def body(state: tuple) -> tuple:
        i, out, cache, tok, done, rng, lengths = state
        pos = (last_pos + i)[:, None]
        logits, cache = fns.step(params, tok[:, None], pos, kv_mask, cache, t + i - 1)
        rng, sub = jax.random.split(rng)
        new = sample(logits, sub, temperature, top_k, top_p)
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(new)
        return i + 1, out, cache, new, done, rng, lengths

    state = (jnp.int32(1), out, cache, tok, done, rng, lengths)
    _, out, _, _, _, _, lengths = jax.lax.while_loop(cond, body, state)
    return out, lengths


class Generator:
    """Compiles `_decode` once per (batch, prompt bucket, new-token bucket) and runs it.

    `compile_count` exposes how many programs were built, so callers (and tests) can check that a serving
    loop is not recompiling per request or per step.
    """

    def __init__(self, fns: DecodeFns, pad_id: int = 0) -> None:
        self.fns = fns
        self.pad_id = pad_id
        self._compiled: dict[tuple, Callable] = {}

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    def __call__(self, params: Any, prompts: Sequence[Sequence[int]] | np.ndarray, *,
                 attention_mask: np.ndarray | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
                 extra: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(tokens [B, max_new_tokens], lengths [B])`; rows are padded with `pad_id` after a stop token.

        `prompts` is a list of token lists (left-padded here) or an already left-padded `[B, T]` array with
        its `attention_mask`.
        """
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
        if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
            arr = np.asarray(prompts, np.int32)
            mask = np.ones_like(arr) if attention_mask is None else np.asarray(attention_mask, np.int32)
            if mask.shape != arr.shape:
                raise ValueError(f"generate: attention_mask {mask.shape} does not match input_ids {arr.shape}")
            if (mask[:, -1] == 0).any():
                raise ValueError("generate: batches must be left-padded (attention_mask[:, -1] must be 1)")
            prompts = [row[m.astype(bool)].tolist() for row, m in zip(arr, mask)]
            for name in TOKEN_ALIGNED_EXTRA & set(extra or {}):
                extra = {**extra, name: [np.asarray(r)[m.astype(bool)] for r, m in zip(extra[name], mask)]}
        t = bucket(max(len(p) for p in prompts))
        ids, mask = left_pad(prompts, t, self.pad_id)
        n = bucket(max_new_tokens, minimum=8)
        extra = dict(extra or {})
        for name in TOKEN_ALIGNED_EXTRA & set(extra):  # per-token inputs get the prompts' left padding
            rows = [np.asarray(r) for r in extra[name]]
            if [len(r) for r in rows] != [len(p) for p in prompts]:
                raise ValueError(f"generate: {name} rows must have the prompts' lengths")
            padded = np.zeros((len(rows), t), rows[0].dtype)
            for i, r in enumerate(rows):
                padded[i, t - len(r):] = r
            extra[name] = padded
        key = (len(prompts), t, n, tuple(sorted((k, np.shape(v)) for k, v in extra.items())))
        if key not in self._compiled:
            self._compiled[key] = jax.jit(lambda *a, **kw: _decode(self.fns, *a, buffer_len=n, **kw))
        if len(stop_tokens) > 16:
            raise ValueError(f"generate: at most 16 stop tokens, got {len(stop_tokens)}")
        stops = np.full((16,), -1, np.int32)  # fixed size: a different stop list never recompiles
        stops[:len(stop_tokens)] = list(stop_tokens)
        out, lengths = self._compiled[key](
            params, ids, mask, jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.int32(top_k),
            jnp.float32(top_p), stops, jnp.int32(max_new_tokens), jnp.int32(self.pad_id), extra=extra)
        return np.asarray(out)[:, :max_new_tokens], np.asarray(lengths)
