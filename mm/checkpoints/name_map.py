"""The per-family name map: a table of `Entry(hf_name, hf_shape, mm_path, transform)` and lookups both ways.

A family (`mm.convert.*_family` and friends, dispatched by `mm.convert.registry`) only builds the table from
its config; the engine (`mm.checkpoints.engine.convert`) does the rest. A `Transform` says how one HF tensor
becomes one mm param and back (rename, transpose, split heads), and what shape it has on each side, so
names and shapes can be checked against safetensors headers before any data is read.

Entries are listed in canonical order (embeddings, layer 0..N-1, final norm, head): conversion streams in
that order and HF output shards follow it. `save_unit(mm_path)` groups params into the units written to
Orbax one at a time (one decoder layer, the embedding, the head, ...), which bounds peak memory to about one
unit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from mm.checkpoints.errors import ConversionError

MMPath = tuple[str, ...]
Box = tuple[slice, ...]  # a region of an array: one `slice(start, stop)` per dimension, steps of 1
# `read_rows(r0, r1, cols)`: rows r0:r1 of the stored HF tensor, and of those only columns `cols` (dimension 1;
# ignored for 1-d tensors) - what a sharded load reads from disk for one region of one param.
ReadRows = Callable[[int, int, slice], np.ndarray]
_NUMBERED = re.compile(r".*_\d+$")
_ALL = slice(None)


# ------------------------------------------------------------------------------------- transforms
_STRIPE = 16  # rows per copy: the source stripe stays in cache while it is scattered into output columns
_SAME_SIZE_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(x: np.ndarray) -> np.ndarray:
    """A contiguous copy of `x.T`, one row stripe at a time, through a same-size unsigned view.

    Measured ~2x faster than numpy's plain `.T` copy on large matrices (and bfloat16 has no fast copy loop of
    its own); each stripe is one numpy copy that releases the GIL, so Orbax's writer threads keep running.
    """
    rows, cols = x.shape
    src = np.ascontiguousarray(x).view(_SAME_SIZE_UINT[x.dtype.itemsize])
    out = np.empty((cols, rows), src.dtype)
    for i in range(0, rows, _STRIPE):
        out[:, i:i + _STRIPE] = src[i:i + _STRIPE].T
    return out.view(x.dtype)


def _span(s: slice) -> tuple[int, int]:
    return int(s.start), int(s.stop)


def _heads_rows(s: slice, head_dim: int) -> tuple[int, int]:
    """The flat `H*hd` range that heads `s` occupy."""
    return int(s.start) * head_dim, int(s.stop) * head_dim


class Transform:
    """Identity: same array on both sides.

    `read_region(read_rows, hf_shape, box)` is the mm-layout region `box` (in the param's mm coordinates) of the
    stored tensor, reading from disk only the rows (and columns) it needs: what `mm.convert.placed` uses to put
    a checkpoint straight into sharded arrays. A transform that knows no better reads everything and slices
    (`_read_whole`); the ones below read just their region."""

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(hf_shape)

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        return self._read_whole(read_rows, hf_shape, box)

    def _read_whole(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        rows = hf_shape[0] if hf_shape else 1
        return np.ascontiguousarray(self.to_mm(read_rows(0, rows, _ALL).reshape(hf_shape))[tuple(box)])

    def __repr__(self) -> str:
        return type(self).__name__


class Identity(Transform):
    """Same array on both sides; a region is a row range (and a column range) of the stored tensor."""

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        if len(hf_shape) == 0:
            return self._read_whole(read_rows, hf_shape, box)
        r0, r1 = _span(box[0])
        cols = box[1] if len(box) > 1 else _ALL
        block = read_rows(r0, r1, cols)
        return np.ascontiguousarray(block[(_ALL, _ALL) + tuple(box[2:])]) if len(box) > 2 else block


class Transpose(Transform):
    """torch `Linear.weight [out, in]` <-> Flax kernel `[in, out]`."""

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(hf_shape))

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return transpose2d(x)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return transpose2d(x)

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        r0, r1 = _span(box[1])  # mm [in, out] = HF [out, in].T
        return transpose2d(read_rows(r0, r1, box[0]))


@dataclasses.dataclass(frozen=True, repr=False)
class SplitHeadsIn(Transform):
    """Projection into heads: HF `[H*hd, D]` <-> mm `[D, H, hd]`."""

    heads: int

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (hf_shape[1], self.heads, hf_shape[0] // self.heads)

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return transpose2d(x).reshape(self.mm_shape(x.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        d, h, hd = x.shape
        return transpose2d(x.reshape(d, h * hd))

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        hd = hf_shape[0] // self.heads
        sd, sh, shd = box  # mm [D, H, hd] from HF rows of heads `sh`, columns `sd`
        block = transpose2d(read_rows(*_heads_rows(sh, hd), sd))
        return np.ascontiguousarray(block.reshape(block.shape[0], -1, hd)[:, :, shd])


@dataclasses.dataclass(frozen=True, repr=False)
class SplitHeadsOut(Transform):
    """Projection out of heads: HF `[D, H*hd]` <-> mm `[H, hd, D]`."""

    heads: int

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.heads, hf_shape[1] // self.heads, hf_shape[0])

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return transpose2d(x).reshape(self.mm_shape(x.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        h, hd, d = x.shape
        return transpose2d(x.reshape(h * hd, d))

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        hd = hf_shape[1] // self.heads
        sh, shd, sd = box  # mm [H, hd, D] from HF rows `sd`, the columns of heads `sh`
        r0, r1 = _span(sd)
        c0, c1 = _heads_rows(sh, hd)
        block = transpose2d(read_rows(r0, r1, slice(c0, c1)))
        return np.ascontiguousarray(block.reshape(-1, hd, block.shape[1])[:, shd, :])


@dataclasses.dataclass(frozen=True, repr=False)
class SplitHeadsBias(Transform):
    """Per-head bias: HF `[H*hd]` <-> mm `[H, hd]`."""

    heads: int

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.heads, hf_shape[0] // self.heads)

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.mm_shape(x.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1)

    def read_region(self, read_rows: ReadRows, hf_shape: tuple[int, ...], box: Box) -> np.ndarray:
        hd = hf_shape[0] // self.heads
        sh, shd = box
        block = read_rows(*_heads_rows(sh, hd), _ALL)
        return np.ascontiguousarray(block.reshape(-1, hd)[:, shd])


IDENTITY = Identity()
TRANSPOSE = Transpose()


# ------------------------------------------------------------------------------------------ table
@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one mm param."""

    hf_name: str
    hf_shape: tuple[int, ...]
    mm_path: MMPath
    transform: Transform = IDENTITY

    @property
    def mm_shape(self) -> tuple[int, ...]:
        return self.transform.mm_shape(self.hf_shape)


def save_unit(mm_path: MMPath) -> MMPath:
    """The prefix written as one save unit (`mm.checkpoints.mm_dir`): up to the first numbered component
    (`layers_3`), else the module that holds the leaf (`mm/embed_tokens`): a unit outside the layers is never
    more than one module, so the largest unit is the largest tensor (an IAA branch's embedding and head, both
    vocab x d, are two units)."""
    for i, part in enumerate(mm_path[:-1]):
        if _NUMBERED.match(part):
            return mm_path[: i + 1]
    return mm_path[:-1] or mm_path


class NameMap:
    """A family's entries plus names a source may hold that are not converted: HF names dropped on import
    (`ignorable`, e.g. `rotary_emb.inv_freq` buffers) and mm paths (`ignorable_mm`, regexes over the
    '/'-joined path) outside the part of a tree this map converts (e.g. the LLM beside a VLM's tower)."""

    def __init__(self, entries: Sequence[Entry], ignorable: Iterable[str] = (), ignorable_mm: Iterable[str] = ()):
        self.entries = tuple(entries)
        self._by_hf = {e.hf_name: e for e in self.entries}
        self._by_mm = {e.mm_path: e for e in self.entries}
        if len(self._by_hf) != len(self.entries) or len(self._by_mm) != len(self.entries):
            raise ValueError("name map has duplicate HF names or mm paths")
        self.ignorable, self.ignorable_mm = tuple(ignorable), tuple(ignorable_mm)
        self._ignorable = [re.compile(p) for p in self.ignorable]
        self._ignorable_mm = [re.compile(p) for p in self.ignorable_mm]

    def expected_hf_names(self) -> dict[str, tuple[int, ...]]:
        return {e.hf_name: e.hf_shape for e in self.entries}

    def expected_mm_paths(self) -> dict[MMPath, tuple[int, ...]]:
        return {e.mm_path: e.mm_shape for e in self.entries}

    def is_ignorable(self, hf_name: str) -> bool:
        return any(p.fullmatch(hf_name) for p in self._ignorable)

    def is_ignorable_mm(self, mm_path: MMPath) -> bool:
        return any(p.fullmatch("/".join(mm_path)) for p in self._ignorable_mm)

    def entry_for_hf(self, hf_name: str) -> Entry:
        try:
            return self._by_hf[hf_name]
        except KeyError as e:
            raise ConversionError(f"unexpected HF tensor {hf_name}") from e

    def entry_for_mm(self, mm_path: MMPath) -> Entry:
        try:
            return self._by_mm[tuple(mm_path)]
        except KeyError as e:
            raise ConversionError(f"unexpected mm param {'/'.join(mm_path)}") from e

    def hf_to_mm(self, hf_name: str, array: np.ndarray) -> tuple[MMPath, np.ndarray]:
        e = self.entry_for_hf(hf_name)
        return e.mm_path, e.transform.to_mm(array)

    def mm_to_hf(self, mm_path: MMPath, array: np.ndarray) -> tuple[str, np.ndarray]:
        e = self.entry_for_mm(mm_path)
        return e.hf_name, e.transform.to_hf(array)

    def units(self) -> list[tuple[MMPath, list[Entry]]]:
        """Entries grouped by save unit, units in canonical order."""
        groups: dict[MMPath, list[Entry]] = {}
        for e in self.entries:
            groups.setdefault(save_unit(e.mm_path), []).append(e)
        return list(groups.items())


def check_names_and_shapes(found: Mapping[str, tuple[int, ...]], name_map: NameMap, source: str,
                           files: Mapping[str, str] | None = None) -> None:
    """Raises one `ConversionError` listing every missing, unexpected and misshapen HF tensor; `files` (tensor
    name -> file name) adds the file each unexpected or misshapen tensor is in."""
    expected = name_map.expected_hf_names()

    def where(n: str) -> str:
        return f" in {files[n]}" if files and n in files else ""

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n + where(n) for n in set(found) - set(expected) if not name_map.is_ignorable(n))
    wrong = sorted(f"{n}: {list(found[n])} (expected {list(expected[n])}){where(n)}"
                   for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong:
        problems.append(f"wrongly shaped tensors {wrong}")
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def check_params(found: Mapping[MMPath, tuple[int, ...]], name_map: NameMap, source: str) -> None:
    """Raises one `ConversionError` listing missing, unexpected and misshapen mm params."""
    expected = name_map.expected_mm_paths()
    show = lambda ps: sorted("/".join(p) for p in ps)  # noqa: E731
    missing = show(set(expected) - set(found))
    unexpected = show(p for p in set(found) - set(expected) if not name_map.is_ignorable_mm(p))
    wrong = sorted(f"{'/'.join(p)}: {list(found[p])} (expected {list(expected[p])})"
                   for p in set(found) & set(expected) if tuple(found[p]) != tuple(expected[p]))
    problems = [f"{what} params {items}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if items]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
