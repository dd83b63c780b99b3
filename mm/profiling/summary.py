"""One summary of a run's traces, all processes together: where each step's time went, who was slow, what ran.

Per process and step (the `train <n>` step annotations mm-train emits): wall time, split into
- compute: time covered by any non-collective XLA op,
- collectives by kind (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, send/recv): time
  covered by that kind's ops and not by compute (nor by a kind already counted), so waiting on a slower peer
  shows here,
- idle: the rest (the host preparing the step, launch gaps);
and host time inside the step: `mm/data` (waiting for the input pipeline) and `mm/dispatch` (launching the step).
Ops are the events carrying an `hlo_op` (CPU thunks) or lying on a device's "XLA Ops" line (TPU / GPU).
Overlapping events are merged as intervals, so nothing is counted twice.

Stragglers: in a synchronous step every process ends together, so a slow one does not show as a longer step
but as the others waiting for it in collectives. A process's *busy* time is its wall minus its collective time;
per step the slowest process is the one with the most, and its lag is that minus the median of the others'.
"""

from __future__ import annotations

import bisect
import collections
import re
import statistics
from pathlib import Path
from typing import Any, Iterable

from mm.profiling import traces

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute", "send/recv")
_KIND = re.compile(r"(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute|\bsend\b|\brecv\b)")
_STEP = re.compile(r"^train(?: (\d+))?$")
HOST_PHASES = {"mm/data": "data_us", "mm/dispatch": "dispatch_us"}

Intervals = list[tuple[float, float]]


def kind_of(op_name: str) -> str | None:
    """The collective kind of an HLO op name (`all-gather.3`, `all-reduce-start.1`, `send.2`), else None."""
    m = _KIND.search(op_name)
    if m is None:
        return None
    k = m.group(1)
    return "send/recv" if k in ("send", "recv") else k


def _union(intervals: Iterable[tuple[float, float]]) -> Intervals:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv: Intervals) -> float:
    return sum(b - a for a, b in iv)


def _outside(a: Intervals, covered: Intervals) -> float:
    """Length of a (a union) not covered by `covered` (a union)."""
    overlap, j = 0.0, 0
    for x0, x1 in a:
        while j < len(covered) and covered[j][1] <= x0:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < x1:
            overlap += max(0.0, min(x1, covered[k][1]) - max(x0, covered[k][0]))
            k += 1
    return _length(a) - overlap


def _is_op(e: dict[str, Any], thread: str) -> bool:
    if e["name"].startswith("end: "):  # CPU thunk executor's completion markers
        return False
    return "hlo_op" in e.get("args", {}) or thread.endswith("XLA Ops")


def step_rows(events: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], collections.Counter]:
    """({step: breakdown in microseconds}, {op name: total us inside steps}) of one session's events."""
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    steps = []
    for e in complete:
        m = _STEP.match(e["name"])
        if m:
            n = e.get("args", {}).get("step_num", m.group(1))
            steps.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), int(n) if n is not None else None))
    steps.sort()
    if steps and any(n is None for *_, n in steps):
        steps = [(a, b, i) for i, (a, b, _) in enumerate(steps)]
    ops = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in complete
                 if _is_op(e, threads.get((e["pid"], e.get("tid")), "")))
    host = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), HOST_PHASES[e["name"]]) for e in complete
                  if e["name"] in HOST_PHASES)
    starts = [o[0] for o in ops]
    rows: dict[int, dict[str, Any]] = {}
    per_op: collections.Counter = collections.Counter()
    for s0, s1, n in steps:
        inside = ops[bisect.bisect_left(starts, s0):bisect.bisect_left(starts, s1)]
        by_kind: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        compute = []
        for a, b, name in inside:
            k = kind_of(name)
            (by_kind[k] if k else compute).append((a, min(b, s1)))
            per_op[name] += b - a
        covered = _union(compute)
        row: dict[str, Any] = {"wall_us": s1 - s0, "compute_us": _length(covered), "collectives_us": {}}
        for k in COLLECTIVE_KINDS:
            if k in by_kind:
                iv = _union(by_kind[k])
                row["collectives_us"][k] = _outside(iv, covered)
                covered = _union(covered + iv)
        row["collectives_total_us"] = sum(row["collectives_us"].values())
        row["idle_us"] = max(row["wall_us"] - row["compute_us"] - row["collectives_total_us"], 0.0)
        for key in HOST_PHASES.values():
            row[key] = 0.0
        for a, b, key in host:
            if a >= s0 and a < s1:
                row[key] += min(b, s1) - a
        rows[n] = row
    return rows, per_op


def _mean(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    if not rows:
        return {}
    out: dict[str, Any] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "collectives_us"}
    kinds = sorted({k for r in rows for k in r["collectives_us"]}, key=COLLECTIVE_KINDS.index)
    out["collectives_us"] = {k: statistics.fmean(r["collectives_us"].get(k, 0.0) for r in rows) for k in kinds}
    return out


def _top(per_op: collections.Counter, top: int) -> list[dict[str, Any]]:
    total = sum(per_op.values()) or 1.0
    return [{"op": name, "us": us, "share": us / total} for name, us in per_op.most_common(top)]


def summarize(profile_dir: str | Path, top: int = 10) -> dict[str, Any]:
    """The summary of every process's sessions under `profile_dir` (JSON-ready)."""
    found = traces.sessions(profile_dir)
    procs: dict[int, dict[str, Any]] = {}
    overall_ops: collections.Counter = collections.Counter()
    for p, files in found.items():
        rows: dict[int, dict[str, Any]] = {}
        per_op: collections.Counter = collections.Counter()
        for f in files:
            r, o = step_rows(traces.events(f))
            rows.update(r)
            per_op.update(o)
        overall_ops.update(per_op)
        procs[p] = {"traces": [str(f) for f in files], "steps": rows, "mean": _mean(rows.values()),
                    "top_ops": _top(per_op, top)}
    common = sorted(set.intersection(*(set(v["steps"]) for v in procs.values()))) if procs else []
    per_step = []
    for s in common:
        busy = {p: v["steps"][s]["wall_us"] - v["steps"][s]["collectives_total_us"] for p, v in procs.items()}
        slowest = max(busy, key=busy.get)
        others = [b for p, b in busy.items() if p != slowest]
        per_step.append({"step": s, "wall_us": max(v["steps"][s]["wall_us"] for v in procs.values()),
                         "slowest": slowest, "lag_us": busy[slowest] - statistics.median(others) if others else 0.0,
                         "busy_us": busy})
    counts = collections.Counter(r["slowest"] for r in per_step)
    return {"profile_dir": str(profile_dir), "processes": procs, "steps": common, "per_step": per_step,
            "overall": _mean(r for v in procs.values() for r in v["steps"].values()),
            "stragglers": {p: {"slowest_steps": counts.get(p, 0),
                               "mean_lag_us": statistics.fmean([r["lag_us"] for r in per_step if r["slowest"] == p])
                               if counts.get(p) else 0.0} for p in procs},
            "top_ops": _top(overall_ops, top)}


def _ms(us: float) -> str:
    return f"{us / 1e3:9.3f} ms"


def _breakdown(m: dict[str, Any]) -> list[str]:
    wall = m.get("wall_us") or 1.0
    lines = [f"    compute     {_ms(m['compute_us'])}  {100 * m['compute_us'] / wall:5.1f}%",
             f"    collectives {_ms(m['collectives_total_us'])}  {100 * m['collectives_total_us'] / wall:5.1f}%"]
    for k, us in m["collectives_us"].items():
        lines.append(f"      {k:<18}{_ms(us)}  {100 * us / wall:5.1f}%")
    lines += [f"    idle        {_ms(m['idle_us'])}  {100 * m['idle_us'] / wall:5.1f}%",
              f"    host: input wait {_ms(m['data_us'])}, dispatch {_ms(m['dispatch_us'])}"]
    return lines


def format_text(s: dict[str, Any]) -> str:
    procs = s["processes"]
    steps = s["steps"]
    span = f"steps {steps[0]}..{steps[-1]}" if steps else "no step present in every process"
    lines = [f"{s['profile_dir']}: {len(procs)} process(es), {span}"]
    for p, v in procs.items():
        m = v["mean"]
        if not m:
            lines.append(f"  process {p}: no step annotations in {v['traces']}")
            continue
        lines.append(f"  process {p}: {len(v['steps'])} step(s), mean step {_ms(m['wall_us']).strip()}")
        lines += _breakdown(m)
    if s["overall"]:
        lines.append(f"  all processes: mean step {_ms(s['overall']['wall_us']).strip()}")
        lines += _breakdown(s["overall"])
    if len(procs) > 1 and s["per_step"]:
        lines.append("  per step (busy = wall - collectives; the slowest process makes the others wait):")
        lines.append("    step      wall        slowest   lag          busy per process")
        for r in s["per_step"]:
            busy = "  ".join(f"p{p} {b / 1e3:.1f}" for p, b in sorted(r["busy_us"].items()))
            lines.append(f"    {r['step']:<6}{_ms(r['wall_us'])}  p{r['slowest']:<7} {_ms(r['lag_us'])}  {busy} ms")
        worst = max(s["stragglers"].items(), key=lambda kv: kv[1]["slowest_steps"])
        lines.append(f"  straggler: process {worst[0]}, slowest in {worst[1]['slowest_steps']} of {len(s['per_step'])} "
                     f"step(s), by {worst[1]['mean_lag_us'] / 1e3:.3f} ms on average")
    lines.append("  top ops (share of op time, all processes):")
    for r in s["top_ops"]:
        lines.append(f"    {r['op'][:60]:<60} {_ms(r['us'])}  {100 * r['share']:5.1f}%")
    return "\n".join(lines)
