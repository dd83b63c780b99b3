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
with HF PEFT).

Shapes under `nn.scan` carry the leading layer axis on all three leaves (`[L, in.., r]`, `[L, r, out..]`,
`[L]`); the rank axis has the logical name `lora_rank` (never sharded), the others their kernel's names.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm.models.partitioning import param

Array = jax.Array
A, B, SCALE = "lora_a", "lora_b", "lora_scale"
LEAVES = (A, B, SCALE)
RANK_AXIS = "lora_rank"

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


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined param path is an adapter leaf."""
    return path.rsplit("/", 1)[-1] in LEAVES


def kernel_of(path: str) -> str:
    """The kernel path an adapter leaf belongs to."""
    return path.rsplit("/", 1)[0] + "/kernel"


def scale(rank: int, alpha: float, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with `use_rslora`."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def split_dims(kernel_ndim: int, a_ndim: int, b_ndim: int) -> tuple[int, int, int]:
    """(stacked layer dims, in dims, out dims) of a kernel from its adapters' ranks."""
    n_stack = a_ndim + b_ndim - 2 - kernel_ndim
    return n_stack, a_ndim - 1 - n_stack, b_ndim - 1 - n_stack


def strip(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat params dict without its adapters: the base model (adapters off)."""
    return {k: v for k, v in flat.items() if not is_adapter(k)}


def delta(a: Any, b: Any, s: Any, n_stack: int) -> Any:
    """`s * A @ B` in the kernel's shape (`in_shape + out_shape`, stacked dims leading), float32."""
    xp = jnp if isinstance(a, jax.Array) else np
    a = xp.asarray(a, xp.float32)
    b = xp.asarray(b, xp.float32)
    s = xp.asarray(s, xp.float32)
    r = a.shape[-1]
    lead = a.shape[:n_stack]
    in_shape, out_shape = a.shape[n_stack:-1], b.shape[n_stack + 1:]
    a2 = a.reshape(*lead, -1, r)
    b2 = b.reshape(*lead, r, -1)
    d = xp.matmul(a2, b2) * s.reshape(*lead, 1, 1)
    return d.reshape(*lead, *in_shape, *out_shape)


def merged(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat params with every adapter merged into its kernel (`W + s A B`, in the kernel's dtype) and the
    adapter leaves dropped: the weights a merged export writes (PEFT's `merge_and_unload`)."""
    out = strip(flat)
    for k in flat:
        if k.endswith("/" + A):
            base = k[: -len(A)]
            w = flat[base + "kernel"]
            a, b, s = flat[k], flat[base + B], flat[base + SCALE]
            n_stack, _, _ = split_dims(len(w.shape), len(a.shape), len(b.shape))
            xp = jnp if isinstance(w, jax.Array) else np
            out[base + "kernel"] = (xp.asarray(w, xp.float32) + delta(a, b, s, n_stack)).astype(w.dtype)
    return out
