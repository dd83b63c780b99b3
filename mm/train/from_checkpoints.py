"""Config sections read from checkpoints, so a run on converted weights never hand-copies shapes.

`llm_section(path)` gives the `model.llm` dict of an HF Llama / Qwen2 directory or an mm "llm" directory;
`vision_section(path)` the `model.vision` dict of an HF CLIP / SigLIP directory or an mm "vision" directory.
Both return every field of the config dataclass, in the JSON-friendly form `mm.train.config` uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mm import paths
from mm.config import ConfigError


def _is_mm(path: Path) -> bool:
    from mm import convert

    return (path / convert.MM_CONFIG_FILE).exists()


def llm_section(path: str | Path) -> dict[str, Any]:
    from mm.config import LLMConfig

    p = paths.local_copy(path)
    if _is_mm(p):
        from mm.convert import mm_dir as mmd

        c = mmd.read_mm_config(p)
        if not isinstance(c, LLMConfig):
            raise ConfigError(f"{p}: an mm checkpoint of kind {mmd.read_mm_manifest(p)['kind']!r}, not an LLM")
    elif (p / "config.json").exists():
        from mm.convert.pipeline import read_hf_llm_config

        c = read_hf_llm_config(p)
    else:
        raise ConfigError(f"{p}: neither an mm checkpoint (mm_config.json) nor an HF one (config.json)")
    d = dataclasses.asdict(c)  # rope_scaling becomes a dict, as model.llm.rope_scaling expects
    d["eos_token_id"] = list(d["eos_token_id"] or ())
    return d


def vision_section(path: str | Path) -> dict[str, Any]:
    from mm.convert import hf_vision

    p = paths.local_copy(path)
    if _is_mm(p):
        c = hf_vision.read_mm_vision_config(p)
    elif (p / "config.json").exists():
        c = hf_vision.read_hf_vision_config(p)
    else:
        raise ConfigError(f"{p}: neither an mm vision checkpoint (mm_config.json) nor an HF one (config.json)")
    return dataclasses.asdict(c)
