"""Parameter groups: which parameters train, at which learning-rate multiplier, and which are frozen.

Rules are an ordered list of `(regex, lr_mult | "frozen")` matched (`re.fullmatch`) against '/'-joined
parameter paths (`base/layers_3/mlp/up_proj/kernel`); the first match wins. A parameter no rule matches stops
the run with its path: silently training (or freezing) something the stage did not mention is worse.

The trainable and frozen parameters are split into two trees. Only the trainable tree is an argument of
`jax.grad`, so frozen parameters get neither gradients nor optimizer state, and XLA never sees their
weight-gradient matmuls.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax

from mm.config import ConfigError

FROZEN = "frozen"


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """'/'-joined path -> leaf (nested dicts only)."""
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Per parameter path: the index of the rule that matched and its value (multiplier or 'frozen')."""

    rules: tuple[tuple[str, Any], ...]
    group_of: dict[str, int]

    def is_trainable(self, path: str) -> bool:
        return self.rules[self.group_of[path]][1] != FROZEN

    def multiplier(self, path: str) -> float:
        return float(self.rules[self.group_of[path]][1])

    @property
    def trainable_paths(self) -> list[str]:
        return [p for p in self.group_of if self.is_trainable(p)]


def assign(paths: Sequence[str], rules: Sequence[Sequence[Any]]) -> Assignment:
    """Matches every path to its first rule; unmatched paths are an error that lists them."""
    compiled = [(re.compile(str(r)), v) for r, v in rules]
    group_of: dict[str, int] = {}
    unmatched = []
    for p in paths:
        for i, (rx, _) in enumerate(compiled):
            if rx.fullmatch(p):
                group_of[p] = i
                break
        else:
            unmatched.append(p)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
        raise ConfigError(f"param_groups: {len(unmatched)} parameters match no rule: {shown}")
    return Assignment(tuple((str(r), v) for r, v in rules), group_of)


def split(params: Any, assignment: Assignment) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen) nested trees; `merge` puts them back together."""
    flat = flatten(params)
    trainable = {p: v for p, v in flat.items() if assignment.is_trainable(p)}
    frozen = {p: v for p, v in flat.items() if not assignment.is_trainable(p)}
    return unflatten(trainable), unflatten(frozen)


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Deep union of two disjoint nested dicts."""
    out = dict(a)
    for k, v in b.items():
        if k in out:
            if not (isinstance(out[k], Mapping) and isinstance(v, Mapping)):
                raise ValueError(f"merge: {k!r} in both trees")
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def group_report(params_or_shapes: Any, assignment: Assignment) -> list[dict[str, Any]]:
    """Per rule: its regex, value, and parameter/tensor counts (for the start-up log)."""
    flat = flatten(params_or_shapes)
    rows = [dict(rule=r, value=v, tensors=0, params=0) for r, v in assignment.rules]
    for p, leaf in flat.items():
        row = rows[assignment.group_of[p]]
        row["tensors"] += 1
        row["params"] += int(getattr(leaf, "size", 0))
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    trainable = sum(r["params"] for r in rows if r["value"] != FROZEN)
    frozen = sum(r["params"] for r in rows if r["value"] == FROZEN)
    lines = [f"{'group':<44} {'lr mult':>8} {'tensors':>8} {'params':>14}"]
    for r in rows:
        v = r["value"] if r["value"] == FROZEN else f"{float(r['value']):g}"
        lines.append(f"{r['rule'][:44]:<44} {v:>8} {r['tensors']:>8} {r['params']:>14,}")
    lines.append(f"trainable params: {trainable:,}   frozen params: {frozen:,}")
    return "\n".join(lines)
