"""LoRA adapters as leaves of a params tree: their names, PEFT's scaling, and merging them into kernels.

A projection kernel `W` (`in_shape + out_shape`) with an adapter has three sibling leaves: `lora_a`
(`in_shape + (r,)`), `lora_b` (`(r,) + out_shape`) and `lora_scale` (a scalar: alpha / r, or alpha / sqrt(r)
for rsLoRA); under `nn.scan` all three carry the leading layer axis (`[L, in.., r]`, `[L, r, out..]`, `[L]`).
The layer math that uses them is `mm.models.lora`; this module is what the trainer, the exports and the PEFT
converter need of them without importing model code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

A, B, SCALE = "lora_a", "lora_b", "lora_scale"
LEAVES = (A, B, SCALE)
RANK_AXIS = "lora_rank"


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
