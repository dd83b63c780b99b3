"""Ahead-of-time compile of a run's train step, and what XLA says it needs per device.

`compile_step(cfg, devices)` builds the run as `mm-train` would (`mm.train.loop.build(abstract=True)`: params,
reference and optimizer state are shapes on their shardings, nothing is loaded or allocated), lowers the step on
one abstract batch of the config's shapes and compiles it for `devices` (8 simulated CPU devices, or abstract TPU
devices from `jax.experimental.topologies`). `memory(compiled)` reads XLA's per-device memory analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mm.train import param_groups as pg


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled train step (XLA's `memory_analysis`)."""

    arguments: int  # state (params + optimizer), frozen params, batch
    outputs: int
    temp: int  # activations, gradients, workspace
    alias: int  # outputs written into donated arguments

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.alias + self.temp


def abstract_batch(cfg: Any, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch's shapes (synthetic data kinds), on `batch_sharding`."""
    from mm.train.data import SyntheticSource

    x = SyntheticSource(cfg).batch_at(0)
    x.pop("example_id")
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in x.items()}


def compile_step(cfg: Any, devices: list[Any]) -> tuple[Any, Any]:
    """(the abstract `Built`, the compiled step)."""
    from mm.train import loop

    b = loop.build(cfg, log=False, devices=devices, abstract=True)
    compiled = b.step_fn.lower(b.state, b.frozen, abstract_batch(cfg, b.batch_sharding)).compile()
    return b, compiled


def memory(compiled: Any) -> StepMemory:
    m = compiled.memory_analysis()
    return StepMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                      int(m.alias_size_in_bytes))


def trainable_counts(b: Any) -> dict[str, int]:
    """Trainable params and the optimizer state's bytes (whole model, not per device)."""
    n = sum(x.size for x in jax.tree.leaves(b.state["params"]))
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(b.state["opt"]))
    frozen = sum(x.size for p, x in pg.flatten(b.frozen).items())
    return {"trainable": int(n), "frozen": int(frozen), "optimizer_bytes": int(opt)}
