"""The collectives in an optimised HLO module (text): one row per op, and totals per kind.

Read from `compiled.as_text()` (what `mm-aot` compiles, and what `--config.profile.dump_hlo=True` writes as
`WORKDIR/hlo/train_step.optimized.txt`). A row: the op's name, kind (all-gather, reduce-scatter, all-reduce,
all-to-all, collective-permute; async `-start` forms count as their kind), the arrays it produces, their bytes,
and its replica groups as XLA printed them, with the group count and size where the format states them
(`{{0,1},{2,3}}`, the iota form `[2,2]<=[4]`, or the mesh form `mesh['axis_0'=4,...] {'axis_0'}`).
"""

from __future__ import annotations

import math
import re
from typing import Any

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=(\{\}|\{\{[\d,{}]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|"
                     r"mesh\[[^\]]*\] \{[^}]*\})")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}


def _groups(text: str) -> tuple[int | None, int | None]:
    """(number of groups, devices a group) of a printed `replica_groups`, None where the text does not say."""
    if text == "{}":
        return None, None
    if text.startswith("{{"):
        groups = [g for g in text[2:-2].split("},{")]
        return len(groups), len(groups[0].split(",")) if groups[0] else 0
    if text.startswith("["):
        dims = [int(x) for x in text[1:text.index("]")].split(",")]
        return (dims[0], math.prod(dims[1:])) if len(dims) > 1 else (1, dims[0])
    axes = dict((k, int(v)) for k, v in _MESH_AXIS.findall(text[:text.index("]")]))
    inner = re.findall(r"'([^']+)'", text[text.index("]") + 1:])
    size = math.prod(axes.get(a, 1) for a in inner)
    return math.prod(axes.values()) // max(size, 1), size


def collective_ops(hlo_text: str) -> list[dict[str, Any]]:
    """Every collective op of the module, in text order."""
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        name, result, kind, start = m.groups()
        arrays = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(result)]
        if start and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
            # async start ops return (operands, results[, contexts]): the result half is what moves
            arrays = arrays[len(arrays) // 2:] if kind == "all-gather" else arrays[1:2]
        g = _GROUPS.search(line)
        groups = g.group(1) if g else ""
        n_groups, group_size = _groups(groups) if groups else (None, None)
        out.append({"name": name, "kind": kind, "arrays": [f"{dt}[{','.join(map(str, s))}]" for dt, s in arrays],
                    "shapes": [[dt, list(s)] for dt, s in arrays],
                    "bytes": sum(math.prod(s) * _BYTES.get(dt, 4) for dt, s in arrays),
                    "replica_groups": groups, "groups": n_groups, "group_size": group_size})
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} over the module's collective ops (bytes: the arrays each op produces)."""
    return collectives_from(collective_ops(hlo_text))


def format_ops(ops: list[dict[str, Any]]) -> str:
    """The per-kind totals, then one line per op."""
    lines = []
    for kind, c in sorted(collectives_from(ops).items()):
        lines.append(f"{kind:<20} {c['count']:>5} ops  {c['bytes'] / 2**20:>10.3f} MiB")
    lines.append("")
    for op in ops:
        where = (f"{op['groups']} group(s) of {op['group_size']}" if op["group_size"] is not None
                 else "all devices")
        lines.append(f"{op['name']:<28} {op['kind']:<18} {op['bytes']:>12,} B  {where:<20} "
                     f"{' '.join(op['arrays'])[:60]}  {op['replica_groups']}")
    return "\n".join(lines)


def collectives_from(ops: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{kind: {count, bytes}} of `collective_ops` rows."""
    out: dict[str, dict[str, int]] = {}
    for op in ops:
        row = out.setdefault(op["kind"], {"count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += op["bytes"]
    return out
