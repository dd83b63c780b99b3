"""Writers: where the engine's tensors go. `start(plan)` receives every tensor's key, shape, dtype and save
unit before any data (so headers and memory are planned up front), `write(key, array)` comes in plan order,
`finish()` returns the result, `abort()` runs instead when the conversion fails.

  TreeWriter         an in-memory nested numpy tree (`load`s without a mesh).
  PlacedWriter       global jax arrays on given shardings; a host builds only the shards its devices hold.
  MMDirWriter        an mm directory's Orbax `params/`, one save unit per incremental save.
  SafetensorsWriter  HF safetensors, sharded with an index when larger than `max_shard_bytes`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import Box, MMPath
from mm.checkpoints.readers import Key
from mm.checkpoints.safetensors_io import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedSafetensorsWriter


@dataclasses.dataclass(frozen=True)
class Planned:
    key: Key
    shape: tuple[int, ...]
    dtype: np.dtype
    unit: MMPath  # the save unit of the entry (`name_map.save_unit` of its mm path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Writer:
    side: str = "mm"
    shardings: Mapping[Key, jax.sharding.Sharding] | None = None  # set: the engine places regions (PlacedWriter)

    def start(self, plan: Sequence[Planned]) -> None:
        self.plan = list(plan)

    def write(self, key: Key, array: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> Any:
        return None

    def abort(self) -> None:
        pass


class TreeWriter(Writer):
    """A nested numpy tree, or with `side="hf"` a flat HF state dict."""

    def __init__(self, side: str = "mm"):
        self.side = side

    def start(self, plan: Sequence[Planned]) -> None:
        super().start(plan)
        self._flat: dict[Key, np.ndarray] = {}

    def write(self, key: Key, array: np.ndarray) -> None:
        self._flat[key] = array

    def finish(self) -> dict[Any, Any]:
        return traverse_util.unflatten_dict(self._flat) if self.side == "mm" else self._flat


def local_box(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[Box, dict[Any, Box]]:
    """The bounding box of the regions this process's devices hold, and each device's region."""
    regions = {d: tuple(slice(*s.indices(n)[:2]) for s, n in zip(ix, shape))
               for d, ix in sharding.addressable_devices_indices_map(shape).items()}
    box = tuple(slice(min(r[i].start for r in regions.values()), max(r[i].stop for r in regions.values()))
                for i in range(len(shape)))
    return box, regions


class PlacedWriter(Writer):
    """Global arrays on `shardings[key]`: `write_region` gets the data of this host's bounding box (what the
    engine reads when the reader has `read_rows`), `write` a whole array, `write_placed` an array already on its
    sharding. `finish()` returns the flat dict key -> jax.Array."""

    side = "mm"

    def __init__(self, shardings: Mapping[Key, jax.sharding.Sharding]):
        self.shardings = dict(shardings)

    def start(self, plan: Sequence[Planned]) -> None:
        super().start(plan)
        self._out: dict[Key, jax.Array] = {}

    def write_region(self, key: Key, block: np.ndarray, box: Box, regions: Mapping[Any, Box],
                     shape: tuple[int, ...]) -> None:
        pieces = []
        for d, r in regions.items():
            rel = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(r, box))
            pieces.append(jax.device_put(block[rel], d))
        self._out[key] = jax.make_array_from_single_device_arrays(shape, self.shardings[key], pieces)

    def write(self, key: Key, array: np.ndarray) -> None:
        shape = tuple(array.shape)
        box, regions = local_box(self.shardings[key], shape)
        self.write_region(key, np.asarray(array)[tuple(box)], box, regions, shape)

    def write_placed(self, key: Key, array: jax.Array) -> None:
        self._out[key] = array

    def finish(self) -> dict[Key, jax.Array]:
        return self._out


class MMDirWriter(Writer):
    """`directory/params/` unit by unit (`mm_dir.ParamWriter`); the caller writes the manifest and stages the
    directory (`mm.checkpoints.staging`). A unit is handed to Orbax as soon as its last tensor arrives, and
    the room for the next unit is reserved right then, before the engine reads any of it: a unit in flight
    and the next one's tensors (read, then transposed) are in memory together only when both fit in
    `ParamWriter.overlap_bytes`."""

    side = "mm"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def start(self, plan: Sequence[Planned]) -> None:
        super().start(plan)
        self._unit_bytes: dict[MMPath, int] = {}
        self._left: dict[MMPath, int] = {}
        for p in self.plan:
            self._unit_bytes[p.unit] = self._unit_bytes.get(p.unit, 0) + p.nbytes
            self._left[p.unit] = self._left.get(p.unit, 0) + 1
        self._order = list(self._unit_bytes)  # units in the order the engine streams them
        self._next = 0
        self._unit_of = {p.key: p.unit for p in self.plan}
        self._params = mmd.ParamWriter(self.directory)
        self._pending: dict[MMPath, np.ndarray] = {}
        self._reserve_next()

    def _reserve_next(self) -> None:
        if self._next < len(self._order):
            self._params.reserve(self._unit_bytes[self._order[self._next]])
            self._next += 1

    def write(self, key: Key, array: np.ndarray) -> None:
        unit = self._unit_of[key]
        self._pending[key] = array
        self._left[unit] -= 1
        if self._left[unit] == 0:  # the unit is complete: to Orbax, then make room for the next one
            self._params.add(traverse_util.unflatten_dict(self._pending))
            self._pending = {}
            self._reserve_next()

    def finish(self) -> Path:
        if self._pending:
            raise ConversionError(f"{self.directory}: units left incomplete: {sorted(self._pending)[:3]}")
        self._params.finalize()
        return self.directory

    def abort(self) -> None:
        self._pending = {}
        self._params.abort()


class SafetensorsWriter(Writer):
    """HF safetensors in `directory` (its `config.json` and other files are the caller's)."""

    side = "hf"

    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 file_names: Sequence[str] | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.file_names = file_names

    def start(self, plan: Sequence[Planned]) -> None:
        super().start(plan)
        self._writer = ShardedSafetensorsWriter(
            self.directory, [PlannedTensor(str(p.key), p.shape, np.dtype(p.dtype)) for p in self.plan],
            self.max_shard_bytes)
        if self.file_names is not None:
            self._writer.files = list(self.file_names)

    def write(self, key: Key, array: np.ndarray) -> None:
        self._writer.write(str(key), array)

    def finish(self) -> Path:
        self._writer.close()
        return self.directory

    def abort(self) -> None:
        self._writer.abort()
