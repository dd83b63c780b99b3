"""The timing every train-step benchmark shares: a built run's step over host batches, the first (compiling)
call excluded."""

from __future__ import annotations

import time
from typing import Any, Iterable

# Llama shapes the train-step benchmarks share (model.llm keys)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16)
LLM_50M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8, num_kv_heads=4,
               head_dim=64)
LLM_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12,
                num_kv_heads=4, head_dim=64)


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
    from mm.train.synthetic_source import SyntheticSource

    src = SyntheticSource(cfg)
    out = []
    for i in range(first, first + n):
        x = src.batch_at(i)
        x.pop("example_id")
        out.append(x)
    return out
