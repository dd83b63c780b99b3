"""mm checkpoint directories of kind "vlm" (IAA or LLaVA-style VLMs with their vision tower).

Same layout as every mm checkpoint (`mm_config.json`, Orbax `params/`, `tokenizer/`): the config section
"vlm" holds `mm.models.vlm.config_to_json`; params are the flat VLM tree (`vision`, and `base`/`mm`/`g` or
`llm`/`projector`), written one save unit (a decoder layer, an embedding, ...) at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mm.convert import mm_dir as mmd
from mm.convert.errors import ConversionError
from mm.convert.hf_vision import vision_entries
from mm.convert.name_map import NameMap
from mm.convert.pipeline import staged_output
from mm.models import vlm

KIND = "vlm"


def vlm_name_map(config: vlm.VLMConfig) -> NameMap:
    """The VLM's params with HF-style names (IAA: release names; LLaVA: HF Llava names)."""
    if config.is_iaa:
        from mm.convert.iaa_release import RELEASE_VISION_PREFIX, release_name_map

        nm = release_name_map(config.lm)
        return NameMap(vision_entries(config.vision, RELEASE_VISION_PREFIX, ("vision",)) + list(nm.entries))
    from mm.convert.llava_hf import llava_name_map

    return llava_name_map(config)


def _parse(d: Mapping[str, Any], source: str) -> vlm.VLMConfig:
    return vlm.config_from_json(dict(d), source)


mmd.KINDS.setdefault(KIND, (KIND, _parse, vlm_name_map))


def save_mm_vlm(config: vlm.VLMConfig, params: Mapping[str, Any], dst: str | Path, *, overwrite: bool = False,
                tokenizer_dir: str | Path | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """Writes a VLM as an mm checkpoint directory (checked against the config's name map first)."""
    name_map = vlm_name_map(config)
    flat = mmd.flatten(params)
    expected = name_map.expected_mm_paths()
    missing = sorted("/".join(p) for p in expected if p not in flat)
    extra = sorted("/".join(p) for p in flat if p not in expected)
    bad = sorted(f"{'/'.join(p)}: {list(np.shape(flat[p]))} (expected {list(s)})"
                 for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != tuple(s))
    if missing or extra or bad:
        raise ConversionError(f"{dst}: params do not fit the config: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}, wrongly shaped {bad[:5]}")
    with staged_output(dst, overwrite) as stage:
        mmd.write_mm_config(stage, KIND, {KIND: vlm.config_to_json(config)}, dict(source or {}))
        if tokenizer_dir is not None:
            mmd.copy_files(Path(tokenizer_dir), stage / mmd.TOKENIZER_DIR, mmd.TOKENIZER_FILES)
        writer = mmd.ParamWriter(stage)
        for _, entries in name_map.units():
            unit: dict[str, Any] = {}
            for e in entries:
                mmd.set_path(unit, e.mm_path, np.asarray(flat[e.mm_path]))
            writer.add(unit)
        writer.finalize()
    return Path(dst)


def load_mm_vlm(path: str | Path, param_dtype: str | None = None, shardings: Any = None
                ) -> tuple[vlm.VLMConfig, dict[str, Any]]:
    config = mmd.read_mm_config(path)
    if not isinstance(config, vlm.VLMConfig):
        raise ConversionError(f"{path}: not a VLM checkpoint")
    name_map = vlm_name_map(config)
    stored = mmd.params_metadata(path)
    mmd.check_params(stored, name_map, str(Path(path) / mmd.PARAMS_DIR))
    paths = list(name_map.expected_mm_paths())
    dtypes = {p: np.dtype(param_dtype) if param_dtype else stored[p][1] for p in paths}
    per_path = None if shardings is None else {p: shardings for p in paths}
    params = mmd.load_param_paths(path, paths, dtypes, {p: stored[p][0] for p in paths}, per_path)
    return config, params
