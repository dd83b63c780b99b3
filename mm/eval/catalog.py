"""The benchmarks of `mm-eval` by name."""

from __future__ import annotations

from mm.config import ConfigError
from mm.eval import mmbench, mme, pope, refcoco
from mm.eval.benchmarks import Benchmark

BENCHMARKS = {b.name: b for b in (mme.BENCHMARK, mmbench.BENCHMARK, pope.BENCHMARK, refcoco.BENCHMARK)}
NAMES = tuple(BENCHMARKS)


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark {name!r}: choose one of {list(NAMES)}")
    return BENCHMARKS[name]
