"""Parameter groups: which parameters train, at which learning-rate multiplier, and which are frozen.

Rules are an ordered list of `(regex, lr_mult | "frozen" | {"lora": {...}})` matched (`re.fullmatch`) against
'/'-joined parameter paths (`base/layers_3/mlp/up_proj/kernel`); the first match wins. A parameter no rule
matches stops the run with its path: silently training (or freezing) something the stage did not mention is
worse.

A LoRA rule, `("llm/layers_\\d+/(self_attn|mlp)/.*", {"lora": {"rank": 32, "alpha": 256}})`, freezes what it
matches and gives each matched projection kernel an adapter (`mm.models.lora`, added by
`mm.train.lora_groups`); the adapter leaves (`.../lora_a`, `.../lora_b`) train at the rule's `lr_mult`
(default 1), `.../lora_scale` is a constant. Keys: `rank` (PEFT's `r`, default 8), `alpha` (`lora_alpha`,
default 8), `rslora` (scale alpha / sqrt(r), default False), `dropout` (only 0.0), `lr_mult`.

The trainable and frozen parameters are split into two trees. Only the trainable tree is an argument of
`jax.grad`, so frozen parameters get neither gradients nor optimizer state, and XLA never sees their
weight-gradient matmuls.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
from flax import traverse_util

from mm.config import ConfigError
from mm import lora_params

FROZEN = "frozen"


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """'/'-joined path -> leaf of any pytree (optimizer states too, which `flax.traverse_util` cannot walk; for
    nested dicts the two agree)."""
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


SCANNED = "layers/layer/"  # mm.models.llm's nn.scan names (an LLM's, or one under a prefix such as an IAA base)
_PER_LAYER = re.compile(r"(^|/)layers_\d+/")


def scanned_name(per_layer: str) -> str:
    """`.../layers_3/x` -> `.../layers/layer/x`: where a scanned tree holds a per-layer param."""
    return _PER_LAYER.sub(lambda m: m.group(1) + SCANNED, per_layer, count=1)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


LORA = "lora"
LORA_DEFAULTS = {"rank": 8, "alpha": 8.0, "rslora": False, "dropout": 0.0, "lr_mult": 1.0}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    rslora: bool
    lr_mult: float


def lora_spec(value: Any, where: str = "param_groups") -> LoraSpec | None:
    """The LoRA settings of a rule's value (None for a multiplier or 'frozen'); ConfigError naming `where`."""
    if not isinstance(value, Mapping) or LORA not in value:
        return None
    if set(value) != {LORA} or not isinstance(value[LORA], Mapping):
        raise ConfigError(f"config key {where} value {dict(value)!r}: expected {{'lora': {{rank, alpha, ...}}}}")
    d = dict(value[LORA])
    unknown = sorted(set(d) - set(LORA_DEFAULTS))
    if unknown:
        raise ConfigError(f"config key {where}.lora: unknown keys {unknown}; known {sorted(LORA_DEFAULTS)}")
    d = {**LORA_DEFAULTS, **d}
    if isinstance(d["rank"], bool) or not isinstance(d["rank"], int) or d["rank"] <= 0:
        raise ConfigError(f"config key {where}.lora.rank = {d['rank']!r}: a positive integer")
    for k in ("alpha", "lr_mult"):
        if isinstance(d[k], bool) or not isinstance(d[k], (int, float)) or d[k] <= 0:
            raise ConfigError(f"config key {where}.lora.{k} = {d[k]!r}: a positive number")
    if d["dropout"] != 0:
        raise ConfigError(f"config key {where}.lora.dropout = {d['dropout']!r}: only 0.0 (no LoRA dropout) is "
                          "implemented")
    if not isinstance(d["rslora"], bool):
        raise ConfigError(f"config key {where}.lora.rslora = {d['rslora']!r}: true or false")
    return LoraSpec(int(d["rank"]), float(d["alpha"]), bool(d["rslora"]), float(d["lr_mult"]))


def has_lora(rules: Sequence[Sequence[Any]]) -> bool:
    return any(lora_spec(v) is not None for _, v in rules)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Per parameter path: the index of the rule that matched, and what the path is under it (a multiplier or
    'frozen'; under a LoRA rule the kernels and other params are frozen, the adapters train)."""

    rules: tuple[tuple[str, Any], ...]
    group_of: dict[str, int]
    value_of: dict[str, Any]

    def is_trainable(self, path: str) -> bool:
        return self.value_of[path] != FROZEN

    def multiplier(self, path: str) -> float:
        return float(self.value_of[path])

    def lora(self, path: str) -> LoraSpec | None:
        """The LoRA settings of the rule that matched `path` (None: not a LoRA rule)."""
        return lora_spec(self.rules[self.group_of[path]][1])

    @property
    def trainable_paths(self) -> list[str]:
        return [p for p in self.group_of if self.is_trainable(p)]


def first_match(paths: Sequence[str], rules: Sequence[Sequence[Any]]) -> dict[str, int]:
    """Each path's first matching rule index; unmatched paths are an error that lists them. Adapter leaves
    belong to their kernel's rule."""
    compiled = [(re.compile(str(r)), v) for r, v in rules]
    group_of: dict[str, int] = {}
    unmatched = []
    for p in paths:
        q = lora_params.kernel_of(p) if lora_params.is_adapter(p) else p
        for i, (rx, _) in enumerate(compiled):
            if rx.fullmatch(q):
                group_of[p] = i
                break
        else:
            unmatched.append(p)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (" ..." if len(unmatched) > 20 else "")
        raise ConfigError(f"param_groups: {len(unmatched)} parameters match no rule: {shown}")
    return group_of


def assign(paths: Sequence[str], rules: Sequence[Sequence[Any]]) -> Assignment:
    """Matches every path to its first rule (see the module docstring)."""
    rules = tuple((str(r), v) for r, v in rules)
    group_of = first_match(paths, rules)
    value_of = {}
    for p, i in group_of.items():
        spec = lora_spec(rules[i][1], f"param_groups[{i}]")
        if spec is None:
            value_of[p] = rules[i][1]
        elif lora_params.is_adapter(p) and not p.endswith("/" + lora_params.SCALE):
            value_of[p] = spec.lr_mult
        else:
            value_of[p] = FROZEN
    return Assignment(rules, group_of, value_of)


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
    rows = [dict(rule=r, value=v, tensors=0, params=0, trainable=0) for r, v in assignment.rules]
    for p, leaf in flat.items():
        row = rows[assignment.group_of[p]]
        row["tensors"] += 1
        n = int(getattr(leaf, "size", 0))
        row["params"] += n
        row["trainable"] += n if assignment.is_trainable(p) else 0
    return rows


def _value_label(v: Any) -> str:
    spec = lora_spec(v)
    if spec is not None:
        return f"lora r{spec.rank}"
    return v if v == FROZEN else f"{float(v):g}"


def format_report(rows: list[dict[str, Any]]) -> str:
    trainable = sum(r["trainable"] for r in rows)
    frozen = sum(r["params"] - r["trainable"] for r in rows)
    lines = [f"{'group':<44} {'lr mult':>8} {'tensors':>8} {'params':>14}"]
    for r in rows:
        lines.append(f"{r['rule'][:44]:<44} {_value_label(r['value']):>8} {r['tensors']:>8} {r['params']:>14,}")
    lines.append(f"trainable params: {trainable:,}   frozen params: {frozen:,}")
    return "\n".join(lines)
