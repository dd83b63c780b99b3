"""Checkpoints read straight into sharded global arrays: a host reads only what its devices hold.

`hf_onto` takes an opened, checked HF safetensors checkpoint and its family's name map; for each param it asks
the sharding which regions this process's devices hold, reads their bounding box from disk through the
entry's transform (`Transform.read_region`: the HF rows, and columns, that the region needs), casts it and
hands each device its piece (`jax.make_array_from_single_device_arrays`). Peak host memory is about one
param's local box plus the device shards; nothing else of the checkpoint is ever in memory. (mm directories
need nothing of this: `mm.convert.mm_dir.load_mm_params(..., shardings=)` is Orbax's sharded restore, which
reads only the chunks each host needs.)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from mm.convert.errors import ConversionError
from mm.convert.name_map import Box, Entry, MMPath, NameMap
from mm.convert.safetensors_io import SafetensorsCheckpoint


def _normalise(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def local_box(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[Box, dict[Any, Box]]:
    """The bounding box of the regions this process's devices hold, and each device's region."""
    regions = {d: _normalise(ix, shape) for d, ix in sharding.addressable_devices_indices_map(shape).items()}
    box = tuple(slice(min(r[i].start for r in regions.values()), max(r[i].stop for r in regions.values()))
                for i in range(len(shape)))
    return box, regions


def place_region(block: np.ndarray, box: Box, regions: Mapping[Any, Box], shape: tuple[int, ...],
                 sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array whose local devices get their regions out of `block` (the data of `box`)."""
    pieces = []
    for d, r in regions.items():
        rel = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(r, box))
        pieces.append(jax.device_put(block[rel], d))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def read_entry(ckpt: SafetensorsCheckpoint, e: Entry, sharding: jax.sharding.Sharding, dtype: Any) -> jax.Array:
    """One HF tensor as the sharded mm param of entry `e`, in `dtype`."""
    shape = tuple(e.mm_shape)
    box, regions = local_box(sharding, shape)
    block = e.transform.read_region(lambda r0, r1, cols: ckpt.read_rows(e.hf_name, r0, r1, cols), e.hf_shape, box)
    block = np.asarray(block).astype(np.dtype(dtype), copy=False)
    return place_region(block, box, regions, shape, sharding)


def hf_onto(ckpt: SafetensorsCheckpoint, name_map: NameMap, shardings: Mapping[MMPath, jax.sharding.Sharding],
            dtype: Any, *, desc: str = "load", progress: bool = True) -> dict[MMPath, jax.Array]:
    """Every entry of `name_map` from an open, already checked checkpoint onto `shardings[mm_path]`."""
    missing = sorted("/".join(e.mm_path) for e in name_map.entries if e.mm_path not in shardings)
    if missing:
        raise ConversionError(f"{ckpt.directory}: params {missing[:5]} have no place (no sharding) in the model")
    total = sum(ckpt.tensors[e.hf_name].nbytes for e in name_map.entries)
    out: dict[MMPath, jax.Array] = {}
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
              disable=not progress or jax.process_index() != 0) as bar:
        for e in name_map.entries:
            bar.set_postfix_str(e.hf_name, refresh=False)
            out[e.mm_path] = read_entry(ckpt, e, shardings[e.mm_path], dtype)
            bar.update(ckpt.tensors[e.hf_name].nbytes)
    return out

