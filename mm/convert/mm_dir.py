"""The mm checkpoint directory: `mm_config.json`, an Orbax `params/` checkpoint, tokenizer files.

Layout (format_version 1)::

    MM_DIR/mm_config.json          {"format_version": 1, "kind": "llm", "llm": LLMConfig.to_json_dict(),
                                    "source": {...provenance...}}
    MM_DIR/params/                 Orbax checkpoint (v1 layout) of the unboxed, per-layer param tree
    MM_DIR/tokenizer/              tokenizer files copied from the HF directory (when it had them)
    MM_DIR/generation_config.json  carried over from HF (when present), written back on export

`kind` names the model family and which sections hold its configs: kind "llm" has one section "llm".
Later kinds (e.g. "iaa", "llava") add their sections and register a name map in `NAME_MAPS`; the param tree
is always the family's unscanned layout, so it restores into any mesh (`load_mm_params(..., shardings=)`).

Params are written with Orbax's incremental partial save, one save unit (a decoder layer, the embedding...)
per call (`ParamWriter`), then finalized: peak memory stays near one or two units, not the model. Arrays are
stored uncompressed (*choice*: zstd costs CPU time and gains little on float weights), in chunks of at most
`CHUNK_BYTES`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from mm.config import ConfigError, LLMConfig, VisionConfig, read_json
from mm.convert.errors import ConversionError
from mm.convert.hf_vision import vision_name_map
from mm.convert.llm_map import llm_name_map
from mm.convert.name_map import MMPath, NameMap

MM_CONFIG_FILE = "mm_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
CHUNK_BYTES = 128 * 1024**2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXTRA_HF_FILES = ("generation_config.json",)

# kind -> (config section, parser, name map builder).
KINDS: dict[str, tuple[str, Callable[..., Any], Callable[[Any], NameMap]]] = {
    "llm": ("llm", LLMConfig.from_json_dict, llm_name_map),
    "vision": ("vision", VisionConfig.from_json_dict, vision_name_map),
}


# ------------------------------------------------------------------------------------- config file
def write_mm_config(mm_dir: str | Path, kind: str, sections: Mapping[str, Any], source: Mapping[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "kind": kind, **sections, "source": dict(source)}
    (Path(mm_dir) / MM_CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_mm_manifest(mm_dir: str | Path) -> dict[str, Any]:
    """The raw `mm_config.json`, with its version and kind checked."""
    path = Path(mm_dir) / MM_CONFIG_FILE
    try:
        d = read_json(path)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    if d.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: format_version={d.get('format_version')!r}, this mm reads {FORMAT_VERSION}")
    if d.get("kind") not in KINDS:
        raise ConversionError(f"{path}: kind={d.get('kind')!r}; known kinds {sorted(KINDS)}")
    return d


def read_mm_config(mm_dir: str | Path) -> Any:
    """The model config of an mm checkpoint (an `LLMConfig` for kind "llm")."""
    d = read_mm_manifest(mm_dir)
    section, parse, _ = KINDS[d["kind"]]
    path = Path(mm_dir) / MM_CONFIG_FILE
    if section not in d:
        raise ConversionError(f"{path}: kind {d['kind']!r} needs a {section!r} section")
    try:
        return parse(d[section], source=f"{path}: {section}")
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{path}: {section}: {e}") from e


def name_map_for(mm_dir: str | Path, config: Any = None) -> NameMap:
    kind = read_mm_manifest(mm_dir)["kind"]
    return KINDS[kind][2](read_mm_config(mm_dir) if config is None else config)


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copies whichever of `names` exist in `src`; returns the copied names."""
    copied = [n for n in names if (src / n).is_file()]
    if copied:
        dst.mkdir(parents=True, exist_ok=True)
    for n in copied:
        shutil.copy2(src / n, dst / n)
    return copied


# -------------------------------------------------------------------------------------- param tree
def set_path(tree: dict[str, Any], path: MMPath, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: MMPath = ()) -> dict[MMPath, Any]:
    out: dict[MMPath, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


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
        self._pending_bytes = sum(x.nbytes for x in flatten(unit_tree).values())

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

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """On failure, lets an in-flight save finish (its own error is dropped) so the caller can delete the
        directory it writes into without racing it."""
        if exc_type is not None and self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - the original exception is the one that matters
                pass
            self._pending = None


def params_metadata(mm_dir: str | Path) -> dict[MMPath, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every stored param, by path (reads metadata only)."""
    path = Path(mm_dir) / PARAMS_DIR
    if not path.is_dir():
        raise ConversionError(f"{path}: no params checkpoint")
    meta = ocp.metadata(path).metadata
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(meta).items()}


def check_params(stored: Mapping[MMPath, tuple[tuple[int, ...], Any]], name_map: NameMap, source: str) -> None:
    """Raises one `ConversionError` listing missing, unexpected and misshapen params."""
    expected = name_map.expected_mm_paths()
    show = lambda ps: sorted("/".join(p) for p in ps)  # noqa: E731
    missing, unexpected = show(set(expected) - set(stored)), show(set(stored) - set(expected))
    wrong = sorted(f"{'/'.join(p)}: {list(stored[p][0])} (expected {list(expected[p])})"
                   for p in set(stored) & set(expected) if tuple(stored[p][0]) != tuple(expected[p]))
    problems = [f"{what} params {items}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)) if items]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def load_param_paths(mm_dir: str | Path, paths: Iterable[MMPath], dtypes: Mapping[MMPath, Any],
                     shapes: Mapping[MMPath, tuple[int, ...]], shardings: Mapping[MMPath, Any] | None = None
                     ) -> dict[str, Any]:
    """Restores just `paths` (numpy arrays, or jax arrays placed by `shardings`), as a nested dict."""
    abstract: dict[str, Any] = {}
    for p in paths:
        if shardings is not None:
            leaf = jax.ShapeDtypeStruct(shapes[p], dtypes[p], sharding=shardings[p])
        else:
            leaf = np.empty(shapes[p], dtypes[p])  # untouched pages: no memory until Orbax writes into it
        set_path(abstract, p, leaf)
    with _load_context():
        return ocp.load(Path(mm_dir) / PARAMS_DIR, abstract)


def load_mm_params(mm_dir: str | Path, config: Any = None, shardings: Any = None) -> dict[str, Any]:
    """The param tree of an mm checkpoint, checked against its config.

    `config` (default: the stored one) fixes the expected tree and the dtype (`param_dtype`) params are
    restored in. `shardings` is one `jax.sharding.Sharding` for every param or a tree of them matching the
    params; with it, params are restored as jax arrays placed directly on those shardings (no host copy of
    the full model), otherwise as numpy arrays.
    """
    mm_dir = Path(mm_dir)
    config = read_mm_config(mm_dir) if config is None else config
    name_map = name_map_for(mm_dir, config)
    stored = params_metadata(mm_dir)
    check_params(stored, name_map, str(mm_dir / PARAMS_DIR))
    dtype = np.dtype(getattr(config, "param_dtype", None) or "float32")
    paths = list(name_map.expected_mm_paths())
    per_path = None
    if shardings is not None:
        if isinstance(shardings, jax.sharding.Sharding):
            per_path = {p: shardings for p in paths}
        else:
            flat = flatten(shardings)
            absent = sorted("/".join(p) for p in paths if p not in flat)
            if absent:
                raise ConversionError(f"shardings tree has no entry for params {absent[:10]}")
            per_path = {p: flat[p] for p in paths}
    return load_param_paths(mm_dir, paths, {p: dtype for p in paths}, {p: stored[p][0] for p in paths}, per_path)
