"""The record each model family fills in, and an opened checkpoint of one.

A `Family` says how its checkpoints look on disk and how they map onto mm params; `mm.convert.registry`
imports every family explicitly and owns the dispatch (which family a directory is, which one writes a
config). Families never import the registry, and nothing registers itself at import time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from mm.checkpoints.name_map import NameMap
from mm.checkpoints.readers import Reader


@dataclasses.dataclass
class Opened:
    """A checkpoint opened for reading: its family, config, a reader and the name map between them."""

    family: "Family | None"  # the family its models are (set by the registry where the reader cannot know it)
    config: Any
    reader: Reader
    name_map: NameMap
    directory: Path
    tokenizer_dir: Path | None = None
    note: str = ""  # what the family decided while opening (e.g. where an IAA release's tower came from)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# (opened mm-side checkpoint of this kind, staging dir, the dir it becomes, dtype, max_shard_bytes, progress)
WriteHF = Callable[[Opened, Path, Path, str, int, bool], None]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    name            what messages call it.
    handle          the `mm.api` handle that serves it: "llm" | "vision" | "vlm".
    kind            the `kind` of the mm directory its models are stored as ("vlm" for LLaVA and IAA releases).
    hf_model_types  `config.json` model_type values of its HF directories (empty: none, or the LLM fallback).
    open_hf         (directory, **family options) -> Opened, for its HF directories (None: no HF reader).
    name_map        config -> NameMap of its mm params (mm directories of `kind`).
    parse           (mm_config.json section, source) -> config; `to_json` the other way.
    with_param_dtype (config, dtype name) -> config.
    write_hf        exports an mm directory of this kind as HF files (None: no HF form).
    hf_files        other files carried between HF and mm directories (e.g. preprocessor_config.json).
    """

    name: str
    handle: str
    kind: str
    name_map: Callable[[Any], NameMap]
    parse: Callable[[Mapping[str, Any], str], Any]
    to_json: Callable[[Any], dict[str, Any]]
    with_param_dtype: Callable[[Any, str], Any]
    hf_model_types: tuple[str, ...] = ()
    open_hf: Callable[..., Opened] | None = None
    write_hf: WriteHF | None = None
    hf_files: tuple[str, ...] = ()
