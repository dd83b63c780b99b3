"""The timing every train-step benchmark shares: a built run's step over host batches, the first (compiling)
call excluded."""

from __future__ import annotations

import time
from typing import Any, Iterable


def mean_step_seconds(b: Any, batches: Iterable[dict[str, Any]]) -> float:
    """Mean seconds per step of `b` (a `mm.train.loop.Built`) over `batches` (host `[accum, rows, ...]` arrays,
    `example_id` dropped), leaving out the first step; the state advances as in training."""
    import jax

    from mm.sharding import global_batch

    state, times = b.state, []
    for x in batches:
        g = global_batch(x, b.batch_sharding, 1)
        t0 = time.perf_counter()
        state, m = b.step_fn(state, b.frozen, g)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    if len(times) < 2:
        raise ValueError("mean_step_seconds: needs the compiling step and at least one more")
    return sum(times[1:]) / (len(times) - 1)


def synthetic_batches(cfg: Any, n: int, first: int = 0) -> list[dict[str, Any]]:
    """`n` host batches of the config's synthetic source, from step `first`, without `example_id`."""
    from mm.train.data import SyntheticSource

    src = SyntheticSource(cfg)
    out = []
    for i in range(first, first + n):
        x = src.batch_at(i)
        x.pop("example_id")
        out.append(x)
    return out
