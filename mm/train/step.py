"""The train step: gradients of the trainable tree only, accumulation, the non-finite guard, the update.

State (a plain dict, so Orbax saves it as is): `params` (trainable only, fp32 master weights), `opt`
(optimizer state for those), `step`, `rng`, `skipped` (updates skipped for non-finite loss/gradients) and
`consecutive` (skips in a row). Frozen params are a separate, non-donated argument: they are merged into the
tree the model sees but are not differentiated, so the compiled step holds no backward for their weights.

Gradient accumulation scans over axis 0 of the batch (`[grad_accum, micro, ...]`); the loss is the mean over
all supervised tokens of the step (sums first, one division), so the result does not depend on how the batch
is split over micro-batches or processes. A step whose loss or gradient norm is not finite keeps params and
optimizer state unchanged (the whole update is selected away) and counts the skip.

A loss function returns `(loss sum, count)` or `(loss sum, count, sums)`: `sums` (a dict, e.g. the preference
loss's TRL metrics times its pair count) are summed like the loss and divided by the step's count, and come
out as `metrics["extra"]`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mm.train.param_groups import merge

Array = jax.Array
LossFn = Callable[[Any, dict[str, Array]], tuple[Any, ...]]  # (sum, count) or (sum, count, extra sums)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(seed), "skipped": jnp.zeros((), jnp.int32),
            "consecutive": jnp.zeros((), jnp.int32)}


def _call(loss_fn: LossFn, params: Any, mb: dict[str, Array]) -> tuple[Array, tuple[Array, dict[str, Array]]]:
    """(loss sum, (count, extra sums)) whichever form `loss_fn` returns."""
    out = loss_fn(params, mb)
    return out[0], (out[1], dict(out[2]) if len(out) > 2 else {})


def _grads(loss_fn: LossFn, trainable: Any, frozen: Any, batch: dict[str, Array]
           ) -> tuple[Any, Array, Array, dict[str, Array]]:
    """Summed gradients, loss sum, token count and extra sums over the accumulation axis."""

    def f(tp: Any, mb: dict[str, Array]) -> tuple[Array, tuple[Array, dict[str, Array]]]:
        return _call(loss_fn, merge(tp, frozen), mb)

    grad_fn = jax.value_and_grad(f, has_aux=True)
    accum = jax.tree.leaves(batch)[0].shape[0]
    if accum == 1:
        (s, (n, extra)), g = grad_fn(trainable, jax.tree.map(lambda x: x[0], batch))
        return g, s, n, extra

    def body(carry: Any, mb: dict[str, Array]) -> tuple[Any, None]:
        (s, aux), g = grad_fn(trainable, mb)
        return jax.tree.map(jnp.add, carry, (g, s, aux)), None

    zero = jnp.zeros((), jnp.float32)
    shapes = jax.eval_shape(lambda: _call(loss_fn, merge(trainable, frozen), jax.tree.map(lambda x: x[0], batch)))
    zeros_aux = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes[1])  # (count, extra sums)
    (g, s, (n, extra)), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, trainable), zero, zeros_aux), batch)
    return g, s, n, extra


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    lr_schedule: Callable[[Any], Any]) -> Callable[..., tuple[dict[str, Any], dict[str, Array]]]:
    def train_step(state: dict[str, Any], frozen: Any, batch: dict[str, Array]) -> tuple[dict[str, Any], dict]:
        batch = {k: v for k, v in batch.items() if k != "example_id"}
        g, s, n, extra = _grads(loss_fn, state["params"], frozen, batch)
        denom = jnp.maximum(n, 1.0)
        g = jax.tree.map(lambda x: x / denom.astype(x.dtype), g)
        loss = s / denom
        gnorm = optax.global_norm(g)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = optimizer.update(g, state["opt"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        rng, _ = jax.random.split(state["rng"])
        new_state = {
            "params": keep(new_params, state["params"]),
            "opt": keep(new_opt, state["opt"]),
            "step": state["step"] + 1,
            "rng": rng,
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
            "consecutive": jnp.where(ok, 0, state["consecutive"] + 1).astype(jnp.int32),
        }
        lr = jnp.asarray(lr_schedule(_opt_count(state["opt"])), jnp.float32)
        metrics = {"loss": loss, "tokens": n, "grad_norm": gnorm, "lr": lr,
                   "finite": ok, "extra": {k: v / denom for k, v in extra.items()}}
        return new_state, metrics

    return train_step


def _opt_count(opt_state: Any) -> Array:
    """The optimizer's update count (the schedule's step), found in the adam state."""
    has_count = lambda x: "count" in getattr(x, "_fields", ())  # noqa: E731 - optax states are namedtuples
    for leaf_state in jax.tree.leaves(opt_state, is_leaf=has_count):
        if has_count(leaf_state):
            return leaf_state.count
    return jnp.zeros((), jnp.int32)


def make_eval_step(loss_fn: LossFn) -> Callable[..., tuple[Array, Array]]:
    def eval_step(trainable: Any, frozen: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
        batch = {k: v for k, v in batch.items() if k != "example_id"}
        params = merge(trainable, frozen)
        s, n = jax.lax.map(lambda mb: tuple(loss_fn(params, mb)[:2]), batch)
        return jnp.sum(s), jnp.sum(n)

    return eval_step
