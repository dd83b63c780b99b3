"""Streaming safetensors IO: read one tensor at a time from single or sharded checkpoints, write sharded ones.

Reading: `SafetensorsCheckpoint(dir)` opens `model.safetensors.index.json` (sharded) or the directory's single
`*.safetensors` file. Names, shapes and dtypes come from the headers (via `safetensors.safe_open`, which also
checks each file's layout), so a whole checkpoint can be validated before any tensor data is read. Data is
read with one `readinto` per tensor at the header's byte offsets straight into a numpy array: safetensors'
numpy backend cannot return bfloat16 and the torch/jax backends cost a framework import and a second copy.
`iter_tensors` reads ahead on a thread (bounded bytes) so disk time overlaps the caller's transforms.

Writing: `ShardedSafetensorsWriter` takes the full list of (name, shape, dtype) up front, plans shards of at
most `max_shard_bytes`, writes each shard's header first and then streams tensors in plan order, so only the
tensor being written is in memory. More than one shard gets an HF-style `model.safetensors.index.json`;
a single shard is written as `model.safetensors` with no index (what `save_pretrained` does).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from mm.checkpoints.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3

# safetensors dtype tag <-> numpy dtype.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_TAGS: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}


def dtype_from_tag(tag: str, where: str = "") -> np.dtype:
    try:
        return _DTYPES[tag]
    except KeyError as e:
        raise ConversionError(f"{where}: safetensors dtype {tag!r} is not supported") from e


def tag_from_dtype(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt not in _TAGS:
        raise ConversionError(f"dtype {dt} cannot be written to safetensors")
    return _TAGS[dt]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header JSON of one safetensors file and the absolute offset where its data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: unreadable safetensors header ({e})") from e
    return header, 8 + n


def _file_tensors(path: Path) -> dict[str, TensorInfo]:
    """All tensors of one file, cross-checked against `safe_open` (which validates the file's layout)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except Exception as e:  # the Rust side raises its own error types
        raise ConversionError(f"{path}: not a valid safetensors file ({e})") from e
    header, base = _read_header(path)
    out = {}
    for name in names:
        h = header[name]
        dt = dtype_from_tag(h["dtype"], f"{path}: {name}")
        b, e = h["data_offsets"]
        shape = tuple(int(s) for s in h["shape"])
        if shape != shapes[name] or e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ConversionError(f"{path}: tensor {name} has an inconsistent header entry")
        out[name] = TensorInfo(name, shape, dt, path, base + b, base + e)
    return out


class SafetensorsCheckpoint:
    """A (possibly sharded) safetensors checkpoint directory, read tensor by tensor."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.directory / INDEX_FILE
        if index.exists():
            self._open_index(index)
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.directory}: no *.safetensors file and no {INDEX_FILE}")
            if len(files) > 1:
                raise ConversionError(f"{self.directory}: {len(files)} safetensors files but no {INDEX_FILE}: "
                                      f"{[f.name for f in files]}")
            self.tensors = _file_tensors(files[0])
        self._handles: dict[Path, BinaryIO] = {}

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index (no weight_map)") from e
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            path = self.directory / fname
            if not path.exists():
                raise ConversionError(f"{index}: shard {fname} (holding e.g. {names[0]}) does not exist")
            in_file = _file_tensors(path)
            for name in names:
                if name not in in_file:
                    raise ConversionError(f"{index}: tensor {name} is mapped to {fname}, which does not contain it")
                self.tensors[name] = in_file[name]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        """One tensor, read from disk into a fresh array (no other tensor is touched)."""
        info = self.tensors[name]
        return self._read_bytes(info, info.start, info.shape)

    def read_rows(self, name: str, r0: int, r1: int, cols: slice = slice(None),
                  stripe_bytes: int = 64 * 1024**2) -> np.ndarray:
        """Rows `r0:r1` of one tensor (its leading dimension; elements of a 1-d one) and of those only `cols` of
        dimension 1. Rows are contiguous on disk, so this reads just their bytes. A column subset is a strided
        region: it is copied out of a read-only memory map in stripes of about `stripe_bytes`, so only the pages
        holding those columns are read, and memory stays near the result."""
        info = self.tensors[name]
        shape = info.shape or (1,)
        if not 0 <= r0 <= r1 <= shape[0]:
            raise ConversionError(f"{info.file}: rows {r0}:{r1} of {name} {list(info.shape)} are out of range")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * info.dtype.itemsize
        whole_cols = len(shape) < 2 or cols == slice(None) or (cols.start or 0, cols.stop) == (0, shape[1])
        if whole_cols:
            return self._read_bytes(info, info.start + r0 * row_bytes, (r1 - r0,) + row_shape).reshape(
                (r1 - r0,) + tuple(info.shape[1:]))
        c0, c1 = int(cols.start or 0), int(shape[1] if cols.stop is None else cols.stop)
        out = np.empty((r1 - r0, c1 - c0) + row_shape[1:], info.dtype)
        if r1 == r0:
            return out
        step = max(1, stripe_bytes // max(row_bytes, 1))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            view = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.start + a * row_bytes,
                             shape=(b - a,) + row_shape)
            out[a - r0:b - r0] = view[:, c0:c1]
            del view  # unmapped: its pages leave this process
        return out

    def _read_bytes(self, info: TensorInfo, start: int, shape: tuple[int, ...]) -> np.ndarray:
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb", buffering=0)
        out = np.empty(shape, info.dtype)
        buf = out.reshape(-1).view(np.uint8)
        f.seek(start)
        got = 0
        while got < buf.nbytes:
            n = f.readinto(memoryview(buf)[got:])
            if not n:
                raise ConversionError(f"{info.file}: truncated while reading {info.name}")
            got += n
        return out

    def iter_tensors(self, names: Sequence[str], read_ahead_bytes: int = 256 * 1024**2
                     ) -> Iterator[tuple[str, np.ndarray]]:
        """`(name, array)` in order, read by a background thread up to `read_ahead_bytes` ahead (at least one
        tensor), so disk reads overlap the caller's work while memory stays bounded."""
        pending: collections.deque = collections.deque()
        inflight = 0
        nxt = 0
        with ThreadPoolExecutor(1, thread_name_prefix="safetensors-read") as pool:
            try:
                while nxt < len(names) or pending:
                    while nxt < len(names) and (not pending or
                                                inflight + self.tensors[names[nxt]].nbytes <= read_ahead_bytes):
                        inflight += self.tensors[names[nxt]].nbytes
                        pending.append((names[nxt], pool.submit(self.read, names[nxt])))
                        nxt += 1
                    name = pending[0][0]
                    inflight -= self.tensors[name].nbytes
                    # No local keeps the future (or its array) alive while the caller works on it.
                    yield name, pending.popleft()[1].result()
            finally:
                for _, fut in pending:
                    fut.cancel()

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ writing
@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(items: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into shards whose headers are written before their data."""

    def __init__(self, directory: str | Path, items: Sequence[PlannedTensor],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(items, max_shard_bytes)
        self.files = shard_file_names(len(self.shards))
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._shard = -1
        self._f: BinaryIO | None = None

    def _header(self, shard: list[PlannedTensor]) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        off = 0
        for t in shard:
            header[t.name] = {"dtype": tag_from_dtype(t.dtype), "shape": list(t.shape),
                              "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self._order):
            raise ConversionError(f"writing {name}: every planned tensor was already written")
        shard_i, planned = self._order[self._pos]
        if name != planned.name or tuple(array.shape) != planned.shape or array.dtype != planned.dtype:
            raise ConversionError(f"writing {name} {array.dtype}{list(array.shape)}: expected {planned.name} "
                                  f"{planned.dtype}{list(planned.shape)} next")
        if shard_i != self._shard:
            if self._f is not None:
                self._f.close()
            self._shard = shard_i
            self._f = open(self.directory / self.files[shard_i], "wb")
            self._f.write(self._header(self.shards[shard_i]))
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._pos += 1

    def abort(self) -> None:
        """Closes the open shard without finishing (the caller discards the directory)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> None:
        """Finishes the last shard and writes the index (sharded output only)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._pos != len(self._order):
            missing = [t.name for _, t in self._order[self._pos:]]
            raise ConversionError(f"{self.directory}: {len(missing)} planned tensors were not written: {missing[:5]}")
        if len(self.shards) > 1:
            weight_map = {t.name: self.files[i] for i, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
