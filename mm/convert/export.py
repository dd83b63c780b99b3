"""Export of in-memory mm params through a name map into HF safetensors files (used by the composite
families: the IAA release layout, HF Llava)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mm.convert import mm_dir as mmd
from mm.convert.errors import ConversionError
from mm.convert.name_map import NameMap
from mm.convert.safetensors_io import PlannedTensor, ShardedSafetensorsWriter


def write_hf_tensors(stage: Path, name_map: NameMap, params: Mapping[str, Any], dtype: str | None,
                     max_shard_bytes: int, file_names: Sequence[str] | None = None) -> None:
    """Writes an in-memory mm param tree as HF safetensors (sharded + index when large) through `name_map`,
    checking every param's presence and shape first. For models small enough to hold in memory; the
    streaming CLI path is `mm.convert.pipeline`."""
    flat = mmd.flatten(params)
    missing = sorted("/".join(e.mm_path) for e in name_map.entries if e.mm_path not in flat)
    if missing:
        raise ConversionError(f"params are missing {missing[:10]}")
    arrays = []
    for e in name_map.entries:
        x = np.asarray(flat[e.mm_path])
        if tuple(x.shape) != e.mm_shape:
            raise ConversionError(f"param {'/'.join(e.mm_path)} has shape {list(x.shape)}, expected {list(e.mm_shape)}")
        arrays.append(e.transform.to_hf(x if dtype is None else x.astype(dtype)))
    plan = [PlannedTensor(e.hf_name, a.shape, a.dtype) for e, a in zip(name_map.entries, arrays)]
    writer = ShardedSafetensorsWriter(stage, plan, max_shard_bytes)
    if file_names is not None:
        writer.files = list(file_names)
    for e, a in zip(name_map.entries, arrays):
        writer.write(e.hf_name, a)
    writer.close()
