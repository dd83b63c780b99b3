"""Summarise a `jax.profiler` trace: step time split into compute, collectives and idle, and the top ops.

Reads the Chrome-trace JSON (`*.trace.json.gz`) the profiler writes next to the `.xplane.pb` (the trace's
own data; no TensorFlow or xprof needed). Steps are the `train` step annotations the training loop emits
(`StepTraceAnnotation`); XLA op events are the complete events on the device / XLA runtime threads whose
names are HLO op names. Per step: compute = time covered by any non-collective op, collectives = time
covered by collective ops (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute,
send/recv) not overlapped by compute, idle = the rest of the step's wall time. Overlapping events (several
threads) are merged as intervals, so nothing is counted twice.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable

COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|\bsend\b|\brecv\b|"
                        r"all_reduce|all_gather|reduce_scatter|psum", re.I)
_RUNTIME = re.compile(r"^(ThunkExecutor|CommonPjRt|PjitFunction|Pjrt|TfrtCpu|XlaModule|\$)")


def find_traces(trace_dir: str | Path) -> list[Path]:
    return sorted(Path(trace_dir).rglob("*.trace.json.gz"))


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in iv)


def _subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of a minus its overlap with b (both unions)."""
    overlap, j = 0.0, 0
    for x0, x1 in a:
        while j < len(b) and b[j][1] <= x0:
            j += 1
        k = j
        while k < len(b) and b[k][0] < x1:
            overlap += max(0.0, min(x1, b[k][1]) - max(x0, b[k][0]))
            k += 1
    return _length(a) - overlap


def summarize_trace(path: str | Path, top: int = 10) -> dict[str, Any]:
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = sorted(((e["ts"], e["ts"] + e["dur"], e) for e in complete
                    if e["name"] == "train" or e["name"].startswith("train ")), key=lambda x: x[0])
    ops = [e for e in complete if not _RUNTIME.match(e["name"]) and e["name"] != "train"
           and not threads.get((e["pid"], e.get("tid")), "").endswith(".py")]
    if not steps:  # no annotations: the whole trace is one window
        t0 = min(e["ts"] for e in complete)
        t1 = max(e["ts"] + e["dur"] for e in complete)
        steps = [(t0, t1, None)]
    rows = []
    per_op: collections.Counter = collections.Counter()
    for s0, s1, _ in steps:
        inside = [e for e in ops if e["ts"] >= s0 and e["ts"] < s1]
        coll = _union((e["ts"], min(e["ts"] + e["dur"], s1)) for e in inside if COLLECTIVE.search(e["name"]))
        comp = _union((e["ts"], min(e["ts"] + e["dur"], s1)) for e in inside if not COLLECTIVE.search(e["name"]))
        wall = s1 - s0
        compute = _length(comp)
        collectives = _subtract(coll, comp)
        rows.append({"wall_us": wall, "compute_us": compute, "collectives_us": collectives,
                     "idle_us": max(wall - compute - collectives, 0.0)})
        for e in inside:
            per_op[e["name"]] += e["dur"]
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in rows[0]}
    total_op = sum(per_op.values()) or 1.0
    return {"trace": str(path), "steps": n, "mean": mean,
            "top_ops": [(name, us, us / total_op) for name, us in per_op.most_common(top)]}


def format_summary(s: dict[str, Any]) -> str:
    m = s["mean"]
    wall = m["wall_us"] or 1.0
    lines = [f"{s['trace']}: {s['steps']} step(s), mean step {m['wall_us'] / 1e3:.3f} ms",
             f"  compute     {m['compute_us'] / 1e3:10.3f} ms  {100 * m['compute_us'] / wall:5.1f}%",
             f"  collectives {m['collectives_us'] / 1e3:10.3f} ms  {100 * m['collectives_us'] / wall:5.1f}%",
             f"  idle        {m['idle_us'] / 1e3:10.3f} ms  {100 * m['idle_us'] / wall:5.1f}%",
             "  top ops (share of op time):"]
    for name, us, frac in s["top_ops"]:
        lines.append(f"    {name[:60]:<60} {us / 1e3:10.3f} ms  {100 * frac:5.1f}%")
    return "\n".join(lines)
