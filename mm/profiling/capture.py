"""What a training run records for profiling (`cfg.profile`), kept out of the loop's body.

- `steps = (a, b)`: a `jax.profiler` trace of steps a+1..b on every process, in
  `WORKDIR/profile/process_<i>/` (xprof / TensorBoard open it; `mm-profile summarize WORKDIR/profile`), and after
  each traced step that process's device memory profile, `memory_step_<n>.prof` (pprof, as
  `jax.profiler.save_device_memory_profile` writes it; `memory=False` turns them off).
- At start-up, always: the compiled step's memory analysis and XLA's FLOPs next to mm's analytic count, logged
  and written to `WORKDIR/compiled_step.json` (the `mm-aot` report's fields, for this run's devices).
- `dump_hlo = True`: the step's lowered (StableHLO) and optimised (HLO, after SPMD partitioning: the sharding
  XLA chose and the collectives it inserted) text in `WORKDIR/hlo/train_step.{lowered,optimized}.txt`;
  `mm-profile collectives WORKDIR` lists the collectives.
- `server_port = N`: `jax.profiler.start_server` on every process, so xprof / TensorBoard can capture the
  running job on demand: process i listens on N + its rank on the host (`local_rank`), e.g.
  `python -m jax.collect_profile N 2000 --log_dir=/tmp/live` on the host of process 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax

_LOCAL_RANK_VARS = ("SLURM_LOCALID", "LOCAL_RANK", "MM_LOCAL_RANK")


def local_rank() -> int:
    """This process's index among the processes on its host (0 where the launcher does not say)."""
    for k in _LOCAL_RANK_VARS:
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def compiled_step_report(b: Any, args: tuple, workdir: Path, *, dump_hlo: bool, write: bool,
                         log: Callable[[str], None]) -> dict[str, Any]:
    """Lowers and compiles the step for `args` (state, frozen, batch: arrays or their shapes), logs and writes
    what XLA says of it. The jitted step reuses this compilation (same arguments, same cache entry)."""
    from mm.profiling import compiled as compiled_lib

    lowered = b.step_fn.lower(*args)
    compiled = lowered.compile()
    n = b.mesh.devices.size
    text = compiled.as_text()  # once: for the collectives and for the dump
    r = compiled_lib.report(b, compiled, n, hlo_text=text)
    log(f"compiled step on {n} x {r['device_kind']}:\n{compiled_lib.format_report(r)}")
    if write:
        (workdir / "compiled_step.json").write_text(json.dumps(r, indent=2, default=str))
        if dump_hlo:
            d = workdir / "hlo"
            d.mkdir(parents=True, exist_ok=True)
            (d / "train_step.lowered.txt").write_text(lowered.as_text())
            (d / "train_step.optimized.txt").write_text(text)
            log(f"wrote the step's HLO to {d}/train_step.{{lowered,optimized}}.txt")
    return r


class Capture:
    """Starts / stops the trace around the profiled steps, saves the memory profiles, runs the server."""

    def __init__(self, profile_cfg: Any, workdir: Path, log: Callable[[str], None]):
        steps = list(profile_cfg.steps)
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (None, None)
        self.memory = bool(profile_cfg.get("memory", True))
        self.dir = workdir / "profile" / f"process_{jax.process_index()}"
        self.tracing = False
        port = int(profile_cfg.get("server_port", 0))
        self.server = None
        if port:
            port += local_rank()
            self.server = jax.profiler.start_server(port)
            # every process says its own port (the run's log is process 0's only)
            sys.stdout.write(f"process {jax.process_index()}: profiler server on port {port} (capture: python -m "
                             f"jax.collect_profile {port} 2000 --log_dir=DIR)\n")
            sys.stdout.flush()

    def before_step(self, s: int) -> None:
        """`s`: steps done so far (the step about to run is s + 1)."""
        if self.first is not None and s == self.first and not self.tracing:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir))
            self.tracing = True

    def after_step(self, s: int) -> None:
        """After step s + 1 was dispatched (and, while tracing, finished)."""
        if not self.tracing:
            return
        if self.memory:
            jax.profiler.save_device_memory_profile(str(self.dir / f"memory_step_{s + 1}.prof"))
        if s + 1 >= self.last:  # the step already finished inside its annotation
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False

    def close(self) -> None:
        self.stop()
        if self.server is not None:
            jax.profiler.stop_server()
            self.server = None
