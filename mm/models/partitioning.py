"""Parameters and activations with logical axis names: the two calls every Flax module in mm uses.

`param` creates a parameter boxed with its logical axes (`mm.sharding.DEFAULT_RULES` maps them onto the mesh);
`constrain` pins an activation's layout (a no-op outside a rules + mesh context).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: Any) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)
