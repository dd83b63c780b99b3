"""HF <-> mm conversion of the decoder LLM, streaming tensor by tensor with bounded memory.

Both directions first check every name and shape from metadata alone (safetensors headers, Orbax metadata)
and raise one `ConversionError` naming all problems before anything is written. Output goes to a hidden
staging directory next to `dst`, renamed into place only when complete, so an interrupted or failed run
never leaves a partial `dst`; an existing `dst` is an error unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from mm.config import ConfigError, LLMConfig, read_json
from mm.convert import mm_dir as mmd
from mm.convert.errors import ConversionError
from mm.convert.llm_map import llm_name_map
from mm.convert.name_map import Entry, NameMap, check_names_and_shapes
from mm.convert.safetensors_io import (DEFAULT_SHARD_BYTES, PlannedTensor, SafetensorsCheckpoint,
                                       ShardedSafetensorsWriter)

DTYPES = ("keep", "float32", "bfloat16", "float16")
_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)}


def out_dtype(dtype: str, stored: np.dtype) -> np.dtype:
    """The dtype a tensor is written in: the stored one for "keep", else the named one."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {DTYPES}")
    return np.dtype(stored) if dtype == "keep" else np.dtype(dtype)


def cast_and_map(array: np.ndarray, dtype: np.dtype, fn: Any) -> np.ndarray:
    """`fn(array)` in `dtype`, casting on whichever side of `fn` has the smaller element (less work)."""
    if array.dtype == dtype:
        return fn(array)
    if dtype.itemsize <= array.dtype.itemsize:
        return fn(array.astype(dtype))
    return fn(array).astype(dtype)


@contextlib.contextmanager
def staged_output(dst: str | Path, overwrite: bool) -> Iterator[Path]:
    """A fresh staging directory that becomes `dst` on success and disappears on failure."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.parent / f".{dst.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            stage.rename(dst)
            shutil.rmtree(old)
        else:
            stage.rename(dst)
    finally:
        if stage.exists():  # failure: never leave a partial output (cleanup errors must not mask the cause)
            shutil.rmtree(stage, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- HF side
def read_hf_llm_config(hf_dir: str | Path, **runtime: Any) -> LLMConfig:
    path = Path(hf_dir) / "config.json"
    try:
        return LLMConfig.from_hf_dict(read_json(path), source=str(path), **runtime)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    except KeyError as e:
        raise ConversionError(f"{path}: missing key {e}") from e


def open_hf_checkpoint(hf_dir: str | Path, name_map: NameMap) -> SafetensorsCheckpoint:
    """Opens the safetensors files and checks names, shapes and dtypes against the name map (headers only)."""
    ckpt = SafetensorsCheckpoint(hf_dir)
    try:
        check_names_and_shapes({n: t.shape for n, t in ckpt.tensors.items()}, name_map, str(hf_dir),
                               files={n: t.file.name for n, t in ckpt.tensors.items()})
        bad = sorted(f"{e.hf_name}: {ckpt.tensors[e.hf_name].dtype}" for e in name_map.entries
                     if ckpt.tensors[e.hf_name].dtype not in _FLOATS)
        if bad:
            raise ConversionError(f"{hf_dir}: tensors with a non-float dtype {bad}")
    except ConversionError:
        ckpt.close()
        raise
    return ckpt


def _kept_dtype_name(dtypes: list[np.dtype]) -> str:
    """The config's `param_dtype` for a checkpoint whose tensors keep their own dtypes."""
    uniq = set(dtypes)
    return str(uniq.pop()) if len(uniq) == 1 else "float32"


def load_hf_llm(hf_dir: str | Path, **runtime: Any) -> tuple[LLMConfig, dict[str, Any]]:
    """Reads an HF Llama/Qwen2 checkpoint straight into an mm param tree (numpy, in `param_dtype`)."""
    config = read_hf_llm_config(hf_dir, **runtime)
    name_map = llm_name_map(config)
    with open_hf_checkpoint(hf_dir, name_map) as ckpt:
        return config, read_params(ckpt, name_map, config.param_dtype)


def read_params(ckpt: SafetensorsCheckpoint, name_map: NameMap, dtype: Any) -> dict[str, Any]:
    """Every entry of `name_map` from an open (already checked) checkpoint into a nested numpy param tree in
    `dtype`. The one in-memory reader every family's `load_*` uses."""
    dtype = np.dtype(dtype)
    params: dict[str, Any] = {}
    for e in name_map.entries:
        mmd.set_path(params, e.mm_path, cast_and_map(ckpt.read(e.hf_name), dtype, e.transform.to_mm))
    return params


def hf_to_mm(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
             progress: bool = True) -> Path:
    """Converts an HF checkpoint directory (Llama / Qwen2, or a CLIP / SigLIP tower) into an mm directory."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    from mm.convert import hf_vision  # CLIP / SigLIP vision towers are their own family

    if hf_vision.hf_dir_is_vision(src):
        return hf_vision.hf_vision_to_mm(src, dst, dtype=dtype, overwrite=overwrite, progress=progress)
    model_type = read_json(src / "config.json").get("model_type") if (src / "config.json").exists() else None
    if model_type in ("llava", "IAA"):
        return vlm_hf_to_mm(src, dst, model_type, dtype=dtype, overwrite=overwrite)
    config = read_hf_llm_config(src)
    name_map = llm_name_map(config)
    return stream_hf_to_mm(src, dst, open_hf_checkpoint(src, name_map), name_map, "llm", config, dtype=dtype,
                           overwrite=overwrite, progress=progress, tokenizer=True, extra_files=mmd.EXTRA_HF_FILES)


def stream_hf_to_mm(src: Path, dst: Path, ckpt: SafetensorsCheckpoint, name_map: NameMap, kind: str, config: Any, *,
                    dtype: str, overwrite: bool, progress: bool, tokenizer: bool = False,
                    extra_files: tuple[str, ...] = ()) -> Path:
    """The streaming loop every family shares: an opened, already checked HF checkpoint -> an mm directory of
    `kind` (config section `kind` = `config.to_json_dict()`), one save unit in memory at a time."""
    with ckpt:
        dtypes = [out_dtype(dtype, ckpt.tensors[e.hf_name].dtype) for e in name_map.entries]
        config = config.replace(param_dtype=_kept_dtype_name(dtypes))
        out_of = dict(zip((e.hf_name for e in name_map.entries), dtypes))
        total = sum(ckpt.tensors[e.hf_name].nbytes for e in name_map.entries)
        with staged_output(dst, overwrite) as stage:
            mmd.write_mm_config(stage, kind, {kind: config.to_json_dict()},
                                {"format": "hf-safetensors", "path": str(Path(src).absolute()), "dtype": dtype})
            if tokenizer:
                mmd.copy_files(src, stage / mmd.TOKENIZER_DIR, mmd.TOKENIZER_FILES)
            mmd.copy_files(src, stage, extra_files)
            units = name_map.units()
            stream = ckpt.iter_tensors([e.hf_name for _, es in units for e in es])
            with mmd.ParamWriter(stage) as writer, contextlib.closing(stream), \
                    _progress(total, "hf-to-mm", progress) as bar:
                for _, entries in units:
                    writer.reserve(sum(int(np.prod(e.mm_shape)) * out_of[e.hf_name].itemsize for e in entries))
                    unit: dict[str, Any] = {}
                    for e in entries:
                        name, arr = next(stream)
                        bar.set_postfix_str(name, refresh=False)
                        mmd.set_path(unit, e.mm_path, cast_and_map(arr, out_of[name], e.transform.to_mm))
                        bar.update(arr.nbytes)
                        del arr
                    writer.add(unit)
                    del unit
                writer.finalize()
    return dst


# ------------------------------------------------------------------------------------------- mm side
def _hf_torch_dtype(dtypes: list[np.dtype]) -> str:
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
            np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(np.dtype(_kept_dtype_name(dtypes)), "float32")


def mm_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
             progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Exports an mm LLM (or vision-tower) checkpoint as an HF directory (config.json, sharded safetensors,
    tokenizer files)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    manifest = mmd.read_mm_manifest(src)
    if manifest["kind"] == "vision":
        from mm.convert.hf_vision import mm_vision_to_hf

        return mm_vision_to_hf(src, dst, dtype=dtype, overwrite=overwrite, progress=progress,
                               max_shard_bytes=max_shard_bytes)
    if manifest["kind"] == "vlm":
        return vlm_mm_to_hf(src, dst, dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    if manifest["kind"] != "llm":
        raise ConversionError(f"{src}: kind {manifest['kind']!r} has no HF causal-LM export")
    config = mmd.read_mm_config(src)

    def extras(stage: Path) -> None:
        if not mmd.copy_files(src, stage, mmd.EXTRA_HF_FILES):
            gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                   "eos_token_id": list(config.eos_token_id) if len(config.eos_token_id) != 1
                   else config.eos_token_id[0]}
            (stage / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        mmd.copy_files(src / mmd.TOKENIZER_DIR, stage, mmd.TOKENIZER_FILES)

    return stream_mm_to_hf(src, dst, llm_name_map(config), config.to_hf_dict, dtype=dtype, overwrite=overwrite,
                           progress=progress, max_shard_bytes=max_shard_bytes, extras=extras)


def stream_mm_to_hf(src: Path, dst: Path, name_map: NameMap, hf_config: Any, *, dtype: str, overwrite: bool,
                    progress: bool, max_shard_bytes: int, extras: Any = None) -> Path:
    """The shared export loop: mm params -> sharded safetensors through `name_map`; `hf_config(torch_dtype=)`
    gives config.json; `extras(stage)` writes whatever else the family carries (tokenizer, processor files)."""
    stored = mmd.params_metadata(src)
    mmd.check_params(stored, name_map, str(src / mmd.PARAMS_DIR))
    units = name_map.units()
    order: list[Entry] = [e for _, es in units for e in es]
    dtypes = {e.mm_path: out_dtype(dtype, stored[e.mm_path][1]) for e in order}
    bad = sorted("/".join(p) for p, dt in dtypes.items() if dt not in _FLOATS)
    if bad:
        raise ConversionError(f"{src}: params with a non-float dtype {bad}")
    plan = [PlannedTensor(e.hf_name, e.hf_shape, dtypes[e.mm_path]) for e in order]
    total = sum(p.nbytes for p in plan)
    with staged_output(dst, overwrite) as stage:
        hf_dtype = _hf_torch_dtype(list(dtypes.values()))
        (stage / "config.json").write_text(json.dumps(hf_config(torch_dtype=hf_dtype), indent=2) + "\n")
        if extras is not None:
            extras(stage)
        writer = ShardedSafetensorsWriter(stage, plan, max_shard_bytes)

        def load_unit(entries: list[Entry]) -> dict[Any, Any]:
            paths = [e.mm_path for e in entries]
            tree = mmd.load_param_paths(src, paths, {p: stored[p][1] for p in paths}, {p: stored[p][0] for p in paths})
            return mmd.flatten(tree)

        # Unit k+1 is restored on a thread while unit k is transposed and written: two units in memory at most.
        with _progress(total, "mm-to-hf", progress) as bar, ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(load_unit, units[0][1])
            for k, (_, entries) in enumerate(units):
                flat = nxt.result()
                nxt = pool.submit(load_unit, units[k + 1][1]) if k + 1 < len(units) else None
                for e in entries:
                    bar.set_postfix_str(e.hf_name, refresh=False)
                    arr = cast_and_map(np.asarray(flat.pop(e.mm_path)), dtypes[e.mm_path], e.transform.to_hf)
                    writer.write(e.hf_name, arr)
                    bar.update(arr.nbytes)
                    del arr
        writer.close()
    return dst


# ----------------------------------------------------------------------------------- VLMs (in memory)
def vlm_hf_to_mm(src: Path, dst: Path, model_type: str, *, dtype: str = "keep", overwrite: bool = False) -> Path:
    """HF Llava or IAA-release directory -> mm "vlm" directory. Loads the model in memory (not streamed):
    fine for the sizes these models come in on one host; `dtype` "keep" stores float32."""
    from mm.convert.vlm_dir import save_mm_vlm

    pdt = "float32" if dtype == "keep" else dtype
    if model_type == "llava":
        from mm.convert.llava_hf import load_llava

        config, params = load_llava(src, param_dtype=pdt)
        note = "HF Llava"
    else:
        from mm.convert.iaa_release import load_release_vlm

        config, params, note = load_release_vlm(src, param_dtype=pdt)
        print(f"hf-to-mm: {note}", flush=True)
    tok = src if any((src / f).exists() for f in mmd.TOKENIZER_FILES) else None
    return save_mm_vlm(config, params, dst, overwrite=overwrite, tokenizer_dir=tok,
                       source={"format": model_type, "path": str(src.absolute()), "note": note})


def vlm_mm_to_hf(src: Path, dst: Path, *, dtype: str = "keep", overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """mm "vlm" directory -> HF Llava directory (LLaVA-style) or the IAA release layout with its tower in
    `dst/vision_tower/` (IAA)."""
    from mm.convert.vlm_dir import load_mm_vlm

    config, params = load_mm_vlm(src)
    out_dtype_name = None if dtype == "keep" else dtype
    tok = src / mmd.TOKENIZER_DIR if (src / mmd.TOKENIZER_DIR).is_dir() else None
    if config.is_iaa:
        from mm.convert.iaa_release import export_release

        lm = {k: v for k, v in params.items() if k != "vision"}
        return export_release(config.lm, lm, dst, dtype=out_dtype_name, overwrite=overwrite, tokenizer_dir=tok,
                              max_shard_bytes=max_shard_bytes, vision=(config.vision, params["vision"]))
    from mm.convert.llava_hf import export_llava

    return export_llava(config, params, dst, dtype=out_dtype_name, overwrite=overwrite, tokenizer_dir=tok,
                        max_shard_bytes=max_shard_bytes)
