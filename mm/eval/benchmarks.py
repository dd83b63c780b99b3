"""The interface every benchmark of `mm-eval` implements, and the registry of them by name.

A benchmark reads its published files into `Item`s (one generated answer each) and scores the per-sample
records the runner writes (`runner.py`): each record is `{"index", "id", "prediction", "image_size", **ref}`
with the item's `ref` (what the scorer needs: the answer, the category, ...). `score(records)` returns the
summary: `{"metrics": {name: value}, "tables": {title: [row dicts]}}`; `chart` names the table and the
column the report plots. The benchmarks by name: `mm.eval.catalog`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from mm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: `image` is encoded bytes or a path relative to the image root; `ref` goes to the record."""

    id: str
    question: str
    image: bytes | str
    ref: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """`read(data, image_root) -> items`; `score(records) -> summary`; `workflow`: the IAA branch it is meant
    for ("g": grounding; the runner falls back to "mm" for models without it); `max_new_tokens`: its answers'
    budget; `chart`: (table title, value column) the report plots."""

    name: str
    read: Callable[[str, str | None], list[Item]]
    score: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
    chart: tuple[str, str]
    workflow: str = "mm"
    max_new_tokens: int = 16


def data_files(data: str, suffixes: Sequence[str]) -> list[Path]:
    """`data` itself when it is a file, else its files with one of `suffixes` (sorted); ConfigError if none."""
    p = Path(data)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"--data {data}: no such file or directory")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise ConfigError(f"--data {data}: no {'/'.join(suffixes)} file in it")
    return files


def ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
