"""The family registry: which family a checkpoint directory is, and the operations every family shares.

Families (one record each, `mm.convert.family.Family`), imported here explicitly:

    family        HF directories (config.json model_type)             mm directories (mm_config.json kind)
    llm_family    llama, qwen2, ... (the fallback)                     "llm"
    hf_vision     clip, siglip, clip_vision_model, siglip_vision_model "vision"
    llava_hf      llava                                                "vlm"
    iaa_release   IAA                                                  "vlm"
    vlm_dir       -                                                    "vlm" (exported as Llava or the release)

Operations, all through the engine (`mm.checkpoints.engine.convert`):
    open_checkpoint(path)       -> Opened (family, config, reader, name map), from metadata only
    load(path | Opened, ...)    -> (config, params): numpy, or placed on shardings
    hf_to_mm(src, dst)          an HF directory -> an mm directory (streamed; bf16 stays bf16 with "keep")
    mm_to_hf(src, dst)          an mm directory -> the family's HF directory
    save(config, params, dst)   in-memory params -> an mm directory
This module is the only one that dispatches over families; nothing below it imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
from absl import logging

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import convert, kept_dtype_name
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.readers import MMDirReader, TreeReader
from mm.checkpoints.safetensors_io import DEFAULT_SHARD_BYTES
from mm.checkpoints.staging import refuse_existing, staged_output
from mm.checkpoints.writers import MMDirWriter, PlacedWriter, TreeWriter
from mm.config import ConfigError, read_json
from mm.convert import hf_vision, iaa_release, llava_hf, llm_family, vlm_dir
from mm.convert.family import Family, Opened

KINDS: dict[str, Family] = {f.kind: f for f in (llm_family.FAMILY, hf_vision.FAMILY, vlm_dir.FAMILY)}
# HF readers by config.json model_type, and the family their models are; the LLM reads every other model_type
# (and names the problem if it cannot). The IAA release's reader takes options (`open_checkpoint`).
HF_FAMILIES: dict[str, tuple[Any, Family]] = {
    **{t: (hf_vision.open_hf, hf_vision.FAMILY) for t in hf_vision.HF_MODEL_TYPES},
    "llava": (llava_hf.open_hf, vlm_dir.FAMILY),
}


def family_of_kind(kind: Any, source: str) -> Family:
    if kind not in KINDS:
        raise ConversionError(f"{source}: kind={kind!r}; known kinds {sorted(KINDS)}")
    return KINDS[kind]


def hf_model_type(directory: Path) -> str | None:
    path = directory / "config.json"
    if not path.exists():
        raise ConversionError(f"{directory}: neither an mm checkpoint ({mmd.MM_CONFIG_FILE}) nor an HF one "
                              "(config.json)")
    try:
        return read_json(path).get("model_type")
    except ConfigError as e:
        raise ConversionError(str(e)) from e


def read_config(path: str | Path) -> Any:
    """The model config of an mm or HF checkpoint directory (metadata only)."""
    with open_checkpoint(path) as opened:
        return opened.config


def _open_mm(directory: Path) -> Opened:
    manifest = mmd.read_mm_manifest(directory)
    where = str(directory / mmd.MM_CONFIG_FILE)
    family = family_of_kind(manifest.get("kind"), where)
    if family.kind not in manifest:
        raise ConversionError(f"{where}: kind {family.kind!r} needs a {family.kind!r} section")
    try:
        config = family.parse(manifest[family.kind], f"{where}: {family.kind}")
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{where}: {family.kind}: {e}") from e
    return Opened(family, config, MMDirReader(directory), family.name_map(config), directory,
                  llm_family.tokenizer_dir_of(directory))


def open_checkpoint(path: str | Path, *, vision: str | Path | None = None, positions: Any = None) -> Opened:
    """The checkpoint at `path` opened for reading (headers / metadata read, nothing else). `vision` and
    `positions` are the IAA release's options (its tower directory; its insertion positions)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: not a directory")
    if mmd.is_mm_dir(directory):
        return _open_mm(directory)
    model_type = hf_model_type(directory)
    if model_type == iaa_release.RELEASE_MODEL_TYPE:
        opened, family = iaa_release.open_hf(directory, vision=vision, positions=positions), vlm_dir.FAMILY
    else:
        read, family = HF_FAMILIES.get(model_type, (llm_family.open_hf, llm_family.FAMILY))
        opened = read(directory)
    opened.family = family
    return opened


def load(path: str | Path | Opened, *, dtype: Any = None, shardings: Any = None, progress: bool = False,
         **options: Any) -> tuple[Any, dict[str, Any]]:
    """(config, params) of a checkpoint: params as a nested numpy tree, or with `shardings` (one Sharding, or a
    mapping / tree of them by mm path) as global jax arrays each host fills with its own regions only.
    `dtype`: the params' dtype ("keep" the stored ones; default the config's `param_dtype` where it has one,
    which is then what the returned config says)."""
    opened = path if isinstance(path, Opened) else open_checkpoint(path, **options)
    try:
        config = opened.config
        if dtype is None:
            dtype = getattr(config, "param_dtype", None) or "keep"
        if dtype != "keep":
            config = opened.family.with_param_dtype(config, str(dtype))
        if shardings is None:
            writer: Any = TreeWriter()
        else:
            writer = PlacedWriter(_per_path(shardings, opened))
        params = convert(opened.reader, opened.name_map, writer, dtype=dtype, progress=progress,
                         desc=f"load {opened.directory.name}")
    finally:
        if not isinstance(path, Opened):
            opened.close()
    if shardings is not None:
        from flax import traverse_util

        params = traverse_util.unflatten_dict(params)
    return config, params


def _per_path(shardings: Any, opened: Opened) -> dict[Any, Any]:
    from flax import traverse_util

    paths = [e.mm_path for e in opened.name_map.entries]
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in paths}
    flat = dict(shardings) if shardings and isinstance(next(iter(shardings)), tuple) else \
        traverse_util.flatten_dict(dict(shardings))
    absent = sorted("/".join(p) for p in paths if p not in flat)
    if absent:
        raise ConversionError(f"{opened.directory}: shardings tree has no entry for params {absent[:10]}")
    return {p: flat[p] for p in paths}


def _write_mm(opened: Opened, stage: Path, *, dtype: Any, progress: bool, source: Mapping[str, Any],
              keep_config_dtype: bool = False) -> None:
    """`opened`'s params as the mm directory of its family's kind in `stage` (manifest, params, tokenizer,
    the family's other HF files)."""
    family = KINDS[opened.family.kind]
    writer = MMDirWriter(stage)
    convert(opened.reader, opened.name_map, writer, dtype=dtype, progress=progress, desc="hf-to-mm")
    config = opened.config
    if not keep_config_dtype:
        config = family.with_param_dtype(config, kept_dtype_name([p.dtype for p in writer.plan]))
    mmd.write_mm_config(stage, family.kind, {family.kind: family.to_json(config)}, dict(source))
    if opened.tokenizer_dir is not None:
        mmd.copy_files(opened.tokenizer_dir, stage / mmd.TOKENIZER_DIR, mmd.TOKENIZER_FILES)
    mmd.copy_files(opened.directory, stage, opened.family.hf_files)


def hf_to_mm(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
             progress: bool = True, vision: str | Path | None = None, positions: Any = None) -> Path:
    """An HF checkpoint directory (LLM, CLIP / SigLIP tower, HF Llava, IAA release) -> an mm directory,
    streamed tensor by tensor ("keep": every tensor in its stored dtype)."""
    refuse_existing(dst, overwrite)
    with open_checkpoint(src, vision=vision, positions=positions) as opened:
        if isinstance(opened.reader, MMDirReader):
            raise ConversionError(f"{src}: already an mm checkpoint ({mmd.MM_CONFIG_FILE})")
        if opened.note:
            logging.warning("hf-to-mm: %s", opened.note)
        source = {"format": "hf-safetensors", "path": str(Path(src).absolute()), "dtype": dtype}
        if opened.note:
            source["note"] = opened.note
        with staged_output(dst, overwrite) as stage:
            _write_mm(opened, stage, dtype=dtype, progress=progress, source=source)
    return Path(dst)


def mm_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
             progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """An mm directory -> its family's HF directory (config.json, sharded safetensors, tokenizer files)."""
    refuse_existing(dst, overwrite)
    with _open_mm(Path(src)) as opened:
        if opened.family.write_hf is None:
            raise ConversionError(f"{src}: kind {opened.family.kind!r} has no HF export")
        with staged_output(dst, overwrite) as stage:
            opened.family.write_hf(opened, stage, Path(dst), dtype, max_shard_bytes, progress)
    return Path(dst)


def save(kind: str, config: Any, params: Mapping[str, Any], dst: str | Path, *, overwrite: bool = False,
         tokenizer_dir: str | Path | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """In-memory params of a model of `kind` ("llm", "vision", "vlm") -> an mm directory, checked against the
    config's name map first; arrays keep their dtypes and the config is written as given."""
    family = family_of_kind(kind, str(dst))
    opened = Opened(family, config, TreeReader(params, f"{dst}: params"), family.name_map(config), Path(dst),
                    None if tokenizer_dir is None else Path(tokenizer_dir))
    with staged_output(dst, overwrite) as stage:
        _write_mm(opened, stage, dtype="keep", progress=False, source=dict(source or {}), keep_config_dtype=True)
    return Path(dst)
