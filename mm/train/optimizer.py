"""The optimiser: global-norm clipping, AdamW on a warmup + cosine schedule, per-group lr multipliers.

Weight decay skips norms and biases (leaves named `scale` / `bias`, and anything 1-D). Per-group learning
rates are one AdamW whose update is scaled per leaf by the group's multiplier: AdamW's update is linear in the
learning rate (including its decoupled decay term), so this equals one AdamW per group, with one state tree.
The optimiser only ever sees the trainable tree (see `param_groups`), so frozen parameters carry no state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mm.train.param_groups import Assignment, flatten, unflatten


def schedule(cfg: Any) -> Callable[[Any], Any]:
    """Linear warmup over `optim.warmup_frac` of the steps, then cosine to `lr * min_lr_ratio`."""
    o, steps = cfg.optim, int(cfg.train.steps)
    warmup = int(round(o.warmup_frac * steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(o.lr), warmup_steps=max(warmup, 0), decay_steps=max(steps, warmup + 1),
        end_value=float(o.lr) * float(o.min_lr_ratio))


def decay_mask(trainable: Any) -> Any:
    """True where weight decay applies: matrices and embeddings, not norm scales or biases."""
    flat = flatten(trainable)
    out = {p: not (p.endswith("/scale") or p.endswith("/bias") or p in ("scale", "bias") or jnp.ndim(v) < 2)
           for p, v in flat.items()}
    return unflatten(out)


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """Stateless: multiplies each leaf's update by its group's lr multiplier."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, trainable: Any, assignment: Assignment) -> optax.GradientTransformation:
    o = cfg.optim
    mults = unflatten({p: assignment.multiplier(p) for p in flatten(trainable)})
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
    parts.append(optax.adamw(schedule(cfg), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=decay_mask(trainable)))
    parts.append(scale_by_multipliers(mults))
    return optax.chain(*parts)
