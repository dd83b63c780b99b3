"""LoRA adapters on projection kernels: the math in the layers, and the adapter leaves in a params tree.

A projection layer with kernel `W` (`in_shape + out_shape`) computes `y = x W (+ b)`; when its params hold
`lora_a` (`in_shape + (r,)`), `lora_b` (`(r,) + out_shape`) and `lora_scale` (a scalar: alpha / r, or
alpha / sqrt(r) for rsLoRA) it computes `y + lora_scale * (x A) B` (PEFT's `lora_B(lora_A(x)) * scaling`, no
dropout). The adapters are applied on the activations, never merged into `W` in the step, so a frozen `W`
gets no weight gradient: only the two thin matmuls of each adapter are differentiated.

Whether a layer is adapted is decided by its params alone: a tree without adapter leaves is the base model
(that is how the DPO reference turns adapters off, `strip`), one with them the adapted model; nothing is passed
through the modules. Which layers *can* be adapted is what `candidates()` reports: inside it, a model's
`init` (or `jax.eval_shape` of it) also creates rank-1 adapter leaves on every layer that calls `add`, so the
trainer learns each adaptable kernel's in / out split and logical axes from the model itself
(`mm.train.lora_groups` turns `param_groups` rules into adapter shapes, `mm.convert.peft_adapter` exchanges them
with HF PEFT). The leaves' names, scaling and merging are `mm.lora_params`.

Shapes under `nn.scan` carry the leading layer axis on all three leaves (`[L, in.., r]`, `[L, r, out..]`,
`[L]`); the rank axis has the logical name `lora_rank` (never sharded), the others their kernel's names.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm.lora_params import A, B, LEAVES, RANK_AXIS, SCALE
from mm.models.partitioning import param

Array = jax.Array

_CANDIDATES: contextvars.ContextVar[bool] = contextvars.ContextVar("mm_lora_candidates", default=False)


@contextlib.contextmanager
def candidates() -> Iterator[None]:
    """Within: initialising a model also creates rank-1 adapters on every adaptable layer (shapes only matter)."""
    token = _CANDIDATES.set(True)
    try:
        yield
    finally:
        _CANDIDATES.reset(token)


def add(module: nn.Module, x: Array, y: Array, axes: tuple[str | None, ...], n_in: int) -> Array:
    """`y` plus the layer's adapter on `x` (its last `n_in` axes are the kernel's first `n_in`), if it has one.
    `axes`: the kernel's logical axes (`in + out`)."""
    if _CANDIDATES.get() and module.is_initializing():
        zeros = nn.initializers.zeros
        in_shape = x.shape[x.ndim - n_in:]
        out_shape = y.shape[y.ndim - (len(axes) - n_in):]
        param(module, A, zeros, (*in_shape, 1), (*axes[:n_in], RANK_AXIS), jnp.float32)
        param(module, B, zeros, (1, *out_shape), (RANK_AXIS, *axes[n_in:]), jnp.float32)
        param(module, SCALE, nn.initializers.ones, (), (), jnp.float32)
    if not module.has_variable("params", A):
        return y
    a, b, s = (nn.unbox(module.get_variable("params", n)) for n in LEAVES)
    dt = y.dtype
    h = jnp.tensordot(x.astype(dt), a.astype(dt), axes=n_in)
    return y + (jnp.tensordot(h, b.astype(dt), axes=1) * s.astype(dt))
