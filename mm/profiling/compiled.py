"""What XLA says of a compiled train step: per-device memory, FLOPs next to mm's analytic count, the cost
model's roofline time (TPU), the collectives it inserted, with the run's config. `mm-aot` prints it for a
topology compiled ahead of time (`mm.train.aot`); `mm-train` logs it at start-up for its own devices and writes
it to WORKDIR/compiled_step.json (`mm.profiling.capture`); `mm-profile summarize` sets the two against a trace.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from mm.profiling import hlo
from mm.train import param_groups as pg

GIB = 1024 ** 3


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


def report(b: Any, compiled: Any, n_devices: int, hbm: int = 0, hlo_text: str | None = None) -> dict[str, Any]:
    """What `mm-aot` prints (and `mm-train` logs at start-up): per-device memory against `hbm`, compiled vs
    analytic FLOPs, the compiler's roofline step time where it gives one (TPU), collectives; with the config, so
    `mm-profile summarize --aot` can tell whether a measured run is the same step. `hlo_text`: the module's
    optimised text when the caller already has it (it is tens of MB at 8B shapes)."""
    from mm.train import schema as tcfg
    from mm.train import flops as flops_lib

    m = memory(compiled)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    optimal = float(cost.get("optimal_seconds", 0.0))  # TPU: the cost model's roofline time of one step
    kind = b.mesh.devices.flat[0].device_kind
    mm_flops = float(b.flops["total"]) / n_devices
    peak = flops_lib.peak_flops(kind)
    return {"devices": n_devices, "device_kind": kind, "memory": dataclasses.asdict(m) | {"total": m.total},
            "hbm": hbm, "fits": (m.total <= hbm) if hbm else None,
            "xla_flops_per_device": flops_lib.xla_flops(compiled), "mm_flops_per_device": mm_flops,
            "xla_optimal_seconds": optimal or None,
            "expected_mfu": mm_flops / optimal / peak if optimal and peak else None,
            "params": trainable_counts(b),
            "collectives": hlo.collectives(compiled.as_text() if hlo_text is None else hlo_text),
            "config": json.loads(tcfg.to_json(b.cfg))}


def format_report(r: dict[str, Any]) -> str:
    m = r["memory"]
    lines = [f"per device ({r['devices']} devices): arguments {m['arguments'] / GIB:.2f} GiB, outputs "
             f"{m['outputs'] / GIB:.2f} GiB (aliased {m['alias'] / GIB:.2f}), temp {m['temp'] / GIB:.2f} GiB, total "
             f"{m['total'] / GIB:.2f} GiB" + (f" of {r['hbm'] / GIB:.0f} GiB HBM: "
                                                f"{'fits' if r['fits'] else 'DOES NOT FIT'}" if r["hbm"] else "")]
    p = r["params"]
    lines.append(f"params: {p['trainable']:,} trainable, {p['frozen']:,} frozen; optimizer state "
                 f"{p['optimizer_bytes'] / GIB:.2f} GiB")
    ratio = r["xla_flops_per_device"] / r["mm_flops_per_device"] if r["mm_flops_per_device"] else float("nan")
    lines.append(f"FLOPs per device per step: XLA {r['xla_flops_per_device']:.3e}, mm analytic "
                 f"{r['mm_flops_per_device']:.3e} (XLA / mm {ratio:.3f})")
    if r.get("xla_optimal_seconds"):
        mfu = f", MFU {100 * r['expected_mfu']:.1f}%" if r.get("expected_mfu") else ""
        lines.append(f"compiler's roofline step time {r['xla_optimal_seconds']:.4f} s{mfu}")
    for kind, c in sorted(r["collectives"].items()):
        lines.append(f"  {kind:<20} {c['count']:>5} ops  {c['bytes'] / 2**20:>10.1f} MiB")
    return "\n".join(lines)
