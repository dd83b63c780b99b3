"""The mm checkpoint directory format: `mm_config.json`, Orbax checkpoints under `params/`, tokenizer files.

Layout (format_version 2)::

    MM_DIR/mm_config.json          {"format_version": 2, "kind": "llm", "llm": LLMConfig.to_json_dict(),
                                    "source": {...provenance...}}
    MM_DIR/params/0000/ ...        one Orbax PyTree checkpoint (stable API, OCDBT + zarr3) per save unit (a
                                   decoder layer, the embedding...) of the unboxed, per-layer param tree
    MM_DIR/tokenizer/              tokenizer files copied from the HF directory (when it had them)
    MM_DIR/generation_config.json  carried over from HF (when present), written back on export

format_version 1 (read, no longer written) had one PyTree checkpoint, `params/state`, built by Orbax's
experimental partial save; a reader sees it as a directory with one unit.

`kind` names the model family and which sections hold its configs (kind "llm" has one section "llm"); which
kinds exist and how their sections parse is the registry's business (`mm.convert.registry`), not this
module's. The param tree is always the family's unscanned layout, so it restores into any mesh.

Params are written one save unit per call (`ParamWriter`), each unit its own checkpoint written by Orbax's
async checkpointer while the caller prepares the next: peak memory stays near one or two units, not the
model. Arrays are stored uncompressed, in chunks of at most `CHUNK_BYTES`. Readers and writers for the engine
are `mm.checkpoints.readers.MMDirReader` and `mm.checkpoints.writers.MMDirWriter`.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from flax import traverse_util

from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import MMPath
from mm.config import ConfigError, read_json

MM_CONFIG_FILE = "mm_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # 1: params/ written by Orbax's experimental partial save
CHUNK_BYTES = 128 * 1024**2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXTRA_HF_FILES = ("generation_config.json",)

# ------------------------------------------------------------------------------------- config file
def write_mm_config(mm_dir: str | Path, kind: str, sections: Mapping[str, Any], source: Mapping[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "kind": kind, **sections, "source": dict(source)}
    (Path(mm_dir) / MM_CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_mm_manifest(mm_dir: str | Path) -> dict[str, Any]:
    """The raw `mm_config.json`, with its format version checked (its kind is the registry's to check)."""
    path = Path(mm_dir) / MM_CONFIG_FILE
    try:
        d = read_json(path)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    if d.get("format_version") not in READS_VERSIONS:
        raise ConversionError(f"{path}: format_version={d.get('format_version')!r}, this mm reads "
                              f"{' and '.join(map(str, READS_VERSIONS))}")
    return d


def is_mm_dir(path: str | Path) -> bool:
    return (Path(path) / MM_CONFIG_FILE).is_file()


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copies whichever of `names` exist in `src`; returns the copied names."""
    copied = [n for n in names if (src / n).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for n in copied:
        shutil.copy2(src / n, dst / n)
    return copied


# -------------------------------------------------------------------------------------- params/
def _handler(writing: bool = False) -> ocp.PyTreeCheckpointHandler:
    # uncompressed (*choice*: zstd costs CPU time and gains little on float weights); zarr3 + OCDBT, the layout
    # format_version 1 was written in, so one reader serves both versions
    kw: dict[str, Any] = {}
    if writing:  # units are numpy trees never touched after `add`: no defensive copy (it doubled peak RSS)
        kw["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))  # none are written; its absence logs a warning
    return ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, use_compression=False, **kw)


def _save_args(tree: Any) -> Any:
    """Chunks of at most `CHUNK_BYTES` (sharded restores read little beyond what each host needs) where they
    are slabs along axis 0, else one chunk. Orbax splits the largest axis first: a `[d, vocab]` head would be
    cut into column chunks, which TensorStore first copies out of the array (a second head-sized buffer for
    the unit in flight, measured +0.98 GiB at 8B shapes, and kept by the allocator afterwards); slabs and a
    single chunk are written from the array in place at the same speed."""
    def args(x: Any) -> Any:
        slabs = x.ndim == 0 or x.shape[0] == max(x.shape)
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) if slabs else ocp.SaveArgs()
    return jax.tree.map(args, tree)


def unit_dirs(mm_dir: str | Path) -> list[Path]:
    """The Orbax PyTree checkpoints `params/` holds: one per save unit (format 2), or `params/state` alone
    (format 1, written by Orbax's experimental partial save, whose merged layout is one PyTree checkpoint)."""
    path = Path(mm_dir) / PARAMS_DIR
    if not path.is_dir():
        raise ConversionError(f"{path}: no params checkpoint")
    return sorted(d for d in path.iterdir() if (d / _PYTREE_METADATA).is_file())


_PYTREE_METADATA = "_METADATA"


class ParamWriter:
    """Builds `params/` unit by unit, each unit one Orbax PyTree checkpoint (`params/<nnnn>/`, written by
    Orbax's async checkpointer); at most one unit is being written while the caller prepares the next, and only
    when both fit in `overlap_bytes` (else the caller waits first). Nothing partial is left by a failure: the
    caller stages the directory (`mm.checkpoints.staging`)."""

    def __init__(self, mm_dir: str | Path, overlap_bytes: int = 1024**3):
        self.path = Path(mm_dir) / PARAMS_DIR
        self.overlap_bytes = overlap_bytes
        self._ckptr = ocp.AsyncCheckpointer(_handler(writing=True))
        self._units = 0
        self._pending_bytes = 0

    def reserve(self, nbytes: int) -> None:
        """Call before preparing a unit of `nbytes`: waits for the write in flight if both would not fit."""
        if self._pending_bytes + nbytes > self.overlap_bytes:
            self.wait()

    def add(self, unit_tree: dict[str, Any]) -> None:
        """Schedules one unit (a nested dict of numpy arrays, disjoint from earlier units)."""
        self.wait()
        self.path.mkdir(parents=True, exist_ok=True)
        self._ckptr.save(self.path / f"{self._units:04d}",
                         args=ocp.args.PyTreeSave(unit_tree, save_args=_save_args(unit_tree)))
        self._units += 1
        self._pending_bytes = sum(x.nbytes for x in traverse_util.flatten_dict(unit_tree).values())

    def wait(self) -> None:
        self._ckptr.wait_until_finished()
        self._pending_bytes = 0

    def finalize(self) -> None:
        self.wait()
        self._ckptr.close()

    def __enter__(self) -> "ParamWriter":
        return self

    def abort(self) -> None:
        """Lets an in-flight save finish (its own error is dropped) so the caller can delete the directory it
        writes into without racing it."""
        try:
            self._ckptr.close()
        except Exception:  # noqa: BLE001 - the original exception is the one that matters
            pass

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def _index(mm_dir: str | Path) -> dict[MMPath, tuple[Path, tuple[int, ...], np.dtype]]:
    """Every stored param: the unit checkpoint that holds it, its shape and dtype (metadata only; cached
    per `params/` directory, which is never changed once written)."""
    path = Path(mm_dir) / PARAMS_DIR
    st = path.stat() if path.is_dir() else None
    return _index_cached(str(path.resolve()), st and (st.st_ino, st.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _index_cached(params: str, _stamp: Any) -> dict[MMPath, tuple[Path, tuple[int, ...], np.dtype]]:
    out: dict[MMPath, tuple[Path, tuple[int, ...], np.dtype]] = {}
    with ocp.Checkpointer(_handler()) as ckptr:
        for d in unit_dirs(Path(params).parent):
            tree = ckptr.metadata(d).item_metadata.tree
            for p, m in traverse_util.flatten_dict(tree).items():
                out[p] = (d, tuple(m.shape), np.dtype(m.dtype))
    return out


def params_metadata(mm_dir: str | Path) -> dict[MMPath, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every stored param, by path (reads metadata only)."""
    return {p: (shape, dtype) for p, (_, shape, dtype) in _index(mm_dir).items()}


def load_param_paths(mm_dir: str | Path, paths: Iterable[MMPath], dtypes: Mapping[MMPath, Any],
                     shapes: Mapping[MMPath, tuple[int, ...]], shardings: Mapping[MMPath, Any] | None = None
                     ) -> dict[str, Any]:
    """Restores just `paths` (numpy arrays, or jax arrays placed by `shardings`), as a nested dict, cast to
    `dtypes`; each unit checkpoint that holds some of them is read once."""
    index = _index(mm_dir)
    by_unit: dict[Path, list[MMPath]] = {}
    for p in paths:
        if p not in index:
            raise ConversionError(f"{Path(mm_dir) / PARAMS_DIR}: no param {'/'.join(map(str, p))}")
        by_unit.setdefault(index[p][0], []).append(p)
    out: dict[MMPath, Any] = {}
    with ocp.Checkpointer(_handler()) as ckptr:
        for d, keys in by_unit.items():
            item, args = {}, {}
            for p in keys:
                if shardings is not None:
                    item[p] = jax.ShapeDtypeStruct(shapes[p], dtypes[p], sharding=shardings[p])
                    args[p] = ocp.ArrayRestoreArgs(sharding=shardings[p], dtype=dtypes[p], global_shape=shapes[p])
                else:
                    item[p] = np.empty(shapes[p], dtypes[p])  # untouched pages: no memory until Orbax fills them
                    args[p] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtypes[p])
            restored = ckptr.restore(d, args=ocp.args.PyTreeRestore(
                item=traverse_util.unflatten_dict(item), restore_args=traverse_util.unflatten_dict(args),
                partial_restore=True))
            out.update(traverse_util.flatten_dict(restored))
    return traverse_util.unflatten_dict(out)
