"""The one conversion loop: `convert(reader, name_map, writer)`, for every load, conversion and export.

1. Check, from metadata alone: every name-map entry is in the reader with its shape (missing, unexpected and
   misshapen tensors all named in one `ConversionError`; the map's ignorable names excepted) and a float dtype.
2. Plan: the output dtype of each tensor (`dtype`: "keep" the stored one, or a dtype name), its shape on the
   writer's side and its save unit, in canonical order (embeddings, layer 0..N-1, head); the writer gets the
   whole plan first.
3. Stream: tensor by tensor in plan order through the entry's transform (HF <-> mm layout, when the reader's
   and the writer's sides differ), cast on whichever side of the transform is smaller. A `PlacedWriter` is fed
   regions instead: from an mm dir by Orbax's sharded restore, from safetensors by reading just the rows /
   columns this host's devices hold (`Transform.read_region`).
Peak memory: the reader's read-ahead plus what the writer holds (one save unit for mm dirs, one tensor for
safetensors). On failure the writer's `abort()` runs; directory writers work inside
`mm.checkpoints.staging.staged_output`, so nothing partial is ever left behind.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import Entry, NameMap, check_names_and_shapes, check_params, save_unit
from mm.checkpoints.readers import Key, Reader
from mm.checkpoints.writers import Planned, Writer, local_box

DTYPES = ("keep", "float32", "bfloat16", "float16")
FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)}


def out_dtype(dtype: Any, stored: np.dtype) -> np.dtype:
    """The dtype a tensor is written in: the stored one for "keep", else the named one."""
    if isinstance(dtype, str) and dtype not in DTYPES and dtype != "float64":
        raise ConversionError(f"dtype={dtype!r}: choose one of {DTYPES}")
    return np.dtype(stored) if dtype == "keep" else np.dtype(dtype)


def kept_dtype_name(dtypes: Sequence[np.dtype]) -> str:
    """A config's `param_dtype` for tensors that keep their own dtypes: theirs when they share one."""
    uniq = {np.dtype(d) for d in dtypes}
    return str(uniq.pop()) if len(uniq) == 1 else "float32"


def cast_and_map(array: np.ndarray, dtype: np.dtype, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`fn(array)` in `dtype`, casting on whichever side of `fn` has the smaller element (less work)."""
    if array.dtype == dtype:
        return fn(array)
    if dtype.itemsize <= array.dtype.itemsize:
        return fn(array.astype(dtype))
    return fn(array).astype(dtype)


def _key(e: Entry, side: str) -> Key:
    return e.hf_name if side == "hf" else e.mm_path


def check(reader: Reader, name_map: NameMap) -> None:
    """Every entry of `name_map` is in `reader` with its shape and a float dtype (one error naming all)."""
    meta = reader.tensors()
    shapes = {k: m.shape for k, m in meta.items()}
    if reader.side == "hf":
        check_names_and_shapes(shapes, name_map, reader.source, files=reader.files())
    else:
        check_params(shapes, name_map, reader.source)
    bad = sorted(f"{_show(_key(e, reader.side))}: {meta[_key(e, reader.side)].dtype}" for e in name_map.entries
                 if np.dtype(meta[_key(e, reader.side)].dtype) not in FLOATS)
    if bad:
        raise ConversionError(f"{reader.source}: tensors with a non-float dtype {bad}")


def _show(key: Key) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)


def plan(reader: Reader, name_map: NameMap, writer_side: str, dtype: Any = "keep") -> list[Planned]:
    """What `convert` will write: key, shape, dtype and save unit of every entry, in canonical order."""
    meta = reader.tensors()
    out = []
    for _, entries in name_map.units():
        for e in entries:
            shape = e.hf_shape if writer_side == "hf" else e.mm_shape
            out.append(Planned(_key(e, writer_side), tuple(shape),
                               out_dtype(dtype, meta[_key(e, reader.side)].dtype), save_unit(e.mm_path)))
    return out


def _transform(e: Entry, src: str, dst: str) -> Callable[[np.ndarray], np.ndarray]:
    if src == dst:
        return lambda x: x
    return e.transform.to_mm if dst == "mm" else e.transform.to_hf


def convert(reader: Reader, name_map: NameMap, writer: Writer, *, dtype: Any = "keep", progress: bool = True,
            desc: str = "convert") -> Any:
    """Checks, then streams every entry of `name_map` from `reader` into `writer`; returns `writer.finish()`."""
    check(reader, name_map)
    the_plan = plan(reader, name_map, writer.side, dtype)
    entries = [e for _, es in name_map.units() for e in es]
    meta = reader.tensors()
    src_keys = [_key(e, reader.side) for e in entries]
    total = sum(meta[k].nbytes for k in src_keys)
    writer.start(the_plan)
    try:
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                  disable=not progress or jax.process_index() != 0) as bar:
            if writer.shardings is None or not _placed(reader, entries, the_plan, writer, bar):
                by_src = {k: (e, p) for k, e, p in zip(src_keys, entries, the_plan)}
                stream = reader.iter(src_keys)
                try:
                    for k, arr in stream:
                        e, p = by_src[k]
                        bar.set_postfix_str(_show(k), refresh=False)
                        writer.write(p.key, cast_and_map(arr, np.dtype(p.dtype),
                                                         _transform(e, reader.side, writer.side)))
                        bar.update(arr.nbytes)
                        del arr
                finally:
                    stream.close()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _placed(reader: Reader, entries: list[Entry], the_plan: list[Planned], writer: Any, bar: tqdm) -> bool:
    """Regional reads for a PlacedWriter where the reader can do them; False: stream whole tensors instead
    (`PlacedWriter.write` places each)."""
    missing = sorted(_show(p.key) for p in the_plan if p.key not in writer.shardings)
    if missing:
        raise ConversionError(f"{reader.source}: params {missing[:5]} have no place (no sharding) in the model")
    meta = reader.tensors()
    if hasattr(reader, "read_placed") and reader.side == writer.side:
        keys = [p.key for p in the_plan]
        got = reader.read_placed(keys, {k: writer.shardings[k] for k in keys}, {p.key: p.dtype for p in the_plan})
        for k in keys:
            writer.write_placed(k, got[k])
        bar.update(sum(meta[k].nbytes for k in keys))
        return True
    if hasattr(reader, "read_rows") and reader.side == "hf" and writer.side == "mm":
        for e, p in zip(entries, the_plan):
            bar.set_postfix_str(e.hf_name, refresh=False)
            box, regions = local_box(writer.shardings[p.key], p.shape)
            block = e.transform.read_region(lambda r0, r1, cols: reader.read_rows(e.hf_name, r0, r1, cols),
                                            e.hf_shape, box)
            writer.write_region(p.key, np.asarray(block).astype(np.dtype(p.dtype), copy=False), box, regions,
                                p.shape)
            bar.update(meta[e.hf_name].nbytes)
        return True
    return False
