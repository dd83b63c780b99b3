"""When a run must stop: a preemption notice, agreed by every process.

One process: SIGTERM sets a flag that the loop reads after each step. Several processes (`jax.distributed`):
JAX's preemption sync manager, which `jax.distributed.initialize` starts, owns SIGTERM (and, on TPU, the
maintenance-event notice) in every process; whichever process gets it, the coordination service picks one step
at which every process's `reached_preemption(step)` is true (Orbax `CheckpointManager.reached_preemption`), so
they all save that same step and exit together. A Python SIGTERM handler there would replace JAX's and leave the
other processes stepping on into collectives the noticed one never joins.
"""

from __future__ import annotations

import signal
from typing import Any

import jax


class Preemption:
    """`with Preemption(manager) as p: ... if p.reached(step): save and stop`."""

    def __init__(self, manager: Any):
        self.manager = manager  # an orbax CheckpointManager
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> "Preemption":
        if jax.process_count() == 1:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no notice can reach this run
                self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """True when the run should save `step` and stop (the same step in every process)."""
        if jax.process_count() == 1:
            return self.requested
        self.requested = self.manager.reached_preemption(step)
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
