"""The mm checkpoint directory format: `mm_config.json`, an Orbax `params/` checkpoint, tokenizer files.

Layout (format_version 1)::

    MM_DIR/mm_config.json          {"format_version": 1, "kind": "llm", "llm": LLMConfig.to_json_dict(),
                                    "source": {...provenance...}}
    MM_DIR/params/                 Orbax checkpoint (v1 layout) of the unboxed, per-layer param tree
    MM_DIR/tokenizer/              tokenizer files copied from the HF directory (when it had them)
    MM_DIR/generation_config.json  carried over from HF (when present), written back on export

`kind` names the model family and which sections hold its configs (kind "llm" has one section "llm"); which
kinds exist and how their sections parse is the registry's business (`mm.convert.registry`), not this
module's. The param tree is always the family's unscanned layout, so it restores into any mesh.

Params are written with Orbax's incremental partial save, one save unit (a decoder layer, the embedding...)
per call (`ParamWriter`), then finalized: peak memory stays near one or two units, not the model. Arrays are
stored uncompressed (*choice*: zstd costs CPU time and gains little on float weights), in chunks of at most
`CHUNK_BYTES`. Readers and writers for the engine are `mm.checkpoints.readers.MMDirReader` and
`mm.checkpoints.writers.MMDirWriter`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from flax import traverse_util

from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import MMPath
from mm.config import ConfigError, read_json

MM_CONFIG_FILE = "mm_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
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
    if d.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: format_version={d.get('format_version')!r}, this mm reads {FORMAT_VERSION}")
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
def _save_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    # Orbax's default chunking wrote at ~0.3 GB/s here; 128 MiB chunks reach disk speed (~1.5 GB/s) while
    # staying small enough for sharded restores to read little beyond what each host needs.
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False  # we never touch an array after handing it over
    return ctx


def _load_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    return ctx


class ParamWriter:
    """Builds `params/` unit by unit with Orbax partial saves; at most one unit is being written while the
    caller prepares the next, and only when both fit in `overlap_bytes` (else the caller waits first)."""

    def __init__(self, mm_dir: str | Path, overlap_bytes: int = 1024**3):
        self.path = Path(mm_dir) / PARAMS_DIR
        self.overlap_bytes = overlap_bytes
        self._ctx = _save_context()
        self._pending: Any = None
        self._pending_bytes = 0

    def reserve(self, nbytes: int) -> None:
        """Call before preparing a unit of `nbytes`: waits for the write in flight if both would not fit."""
        if self._pending_bytes + nbytes > self.overlap_bytes:
            self.wait()

    def add(self, unit_tree: dict[str, Any]) -> None:
        """Schedules one unit (a nested dict of numpy arrays, disjoint from earlier units)."""
        self.wait()
        with self._ctx:
            self._pending = ocp.partial.save_async(self.path, unit_tree)
        self._pending_bytes = sum(x.nbytes for x in traverse_util.flatten_dict(unit_tree).values())

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._pending_bytes = 0

    def finalize(self) -> None:
        self.wait()
        with self._ctx:
            ocp.partial.finalize(self.path)

    def __enter__(self) -> "ParamWriter":
        return self

    def abort(self) -> None:
        """Lets an in-flight save finish (its own error is dropped) so the caller can delete the directory it
        writes into without racing it."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - the original exception is the one that matters
                pass
            self._pending = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def params_metadata(mm_dir: str | Path) -> dict[MMPath, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every stored param, by path (reads metadata only)."""
    path = Path(mm_dir) / PARAMS_DIR
    if not path.is_dir():
        raise ConversionError(f"{path}: no params checkpoint")
    meta = ocp.metadata(path).metadata
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in traverse_util.flatten_dict(meta).items()}


def load_param_paths(mm_dir: str | Path, paths: Iterable[MMPath], dtypes: Mapping[MMPath, Any],
                     shapes: Mapping[MMPath, tuple[int, ...]], shardings: Mapping[MMPath, Any] | None = None
                     ) -> dict[str, Any]:
    """Restores just `paths` (numpy arrays, or jax arrays placed by `shardings`), as a nested dict."""
    abstract: dict[MMPath, Any] = {}
    for p in paths:
        if shardings is not None:
            abstract[p] = jax.ShapeDtypeStruct(shapes[p], dtypes[p], sharding=shardings[p])
        else:
            abstract[p] = np.empty(shapes[p], dtypes[p])  # untouched pages: no memory until Orbax writes them
    with _load_context():
        return ocp.load(Path(mm_dir) / PARAMS_DIR, traverse_util.unflatten_dict(abstract))
