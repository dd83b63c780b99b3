"""Config sections read from checkpoints, so a run on converted weights never hand-copies shapes.

`llm_section(path)` gives the `model.llm` dict of an HF Llama / Qwen2 directory or an mm "llm" directory;
`vision_section(path)` the `model.vision` dict of an HF CLIP / SigLIP directory or an mm "vision" directory.
Both return every field of the config dataclass, in the JSON-friendly form `mm.train.schema` uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mm import paths
from mm.config import ConfigError


def _config(path: str | Path, handle: str, what: str) -> Any:
    from mm.checkpoints.errors import ConversionError
    from mm.convert import registry

    p = paths.local_copy(path)
    try:
        with registry.open_checkpoint(p) as opened:
            if opened.family.handle != handle:
                raise ConfigError(f"{p}: a {opened.family.name} checkpoint, not {what}")
            return opened.config
    except ConversionError as e:
        raise ConfigError(str(e)) from e


def llm_section(path: str | Path) -> dict[str, Any]:
    d = dataclasses.asdict(_config(path, "llm", "an LLM"))  # rope_scaling becomes a dict, as model.llm expects
    d["eos_token_id"] = list(d["eos_token_id"] or ())
    return d


def vision_section(path: str | Path) -> dict[str, Any]:
    return dataclasses.asdict(_config(path, "vision", "a vision tower"))
