"""Checkpoint conversion between HuggingFace safetensors and mm checkpoints, streaming tensor by tensor.

Modules (one job each):
  errors          `ConversionError`, the one exception for bad input (names the file / tensor / key).
  safetensors_io  read single or sharded (`model.safetensors.index.json`) checkpoints one tensor at a time;
                  write sharded safetensors + index with the headers planned up front.
  name_map        the per-family interface: `Entry`, `Transform`s, `NameMap`, `save_unit`.
  llm_map         the Llama / Qwen2 decoder table (`llm_entries`, `llm_name_map`).
  mm_dir          the mm checkpoint directory (mm_config.json, Orbax params/, tokenizer/), `load_mm_params`.
  pipeline        `hf_to_mm`, `mm_to_hf`, `load_hf_llm`: validation first, staged output, bounded memory.
Families built on these pieces: `hf_vision` (CLIP / SigLIP towers), `llava_hf` (HF Llava), `iaa_release`
(the IAA release layout), `vlm_dir` (kind "vlm" mm directories), `export` (in-memory params -> HF files).
A kind registered by such a module is known to `read_mm_config` once that module has been imported.

Adding a family (vision towers, LLaVA, the IAA release layout)
--------------------------------------------------------------
A family is a function `config -> NameMap`. A `NameMap` is a list of `Entry(hf_name, hf_shape, mm_path,
transform)` in canonical order plus regexes of HF names that may be present and are dropped. It gives:

  name_map.expected_hf_names()          {hf_name: hf_shape}    (checked against safetensors headers)
  name_map.expected_mm_paths()          {mm_path: mm_shape}    (checked against Orbax metadata)
  name_map.hf_to_mm(hf_name, array)  -> (mm_path, array)
  name_map.mm_to_hf(mm_path, array)  -> (hf_name, array)
  name_map.units()                      entries grouped into Orbax save units (`save_unit`: up to the first
                                        numbered path component such as `layers_3`, else the top-level key)

`mm_path` is a tuple of keys into the unboxed, per-layer param tree, e.g. `("layers_0", "self_attn",
"q_proj", "kernel")`. Transforms: `IDENTITY`, `TRANSPOSE` (torch Linear `[out, in]` <-> kernel `[in, out]`),
`SplitHeadsIn(h)` (`[h*hd, D]` <-> `[D, h, hd]`), `SplitHeadsOut(h)` (`[D, h*hd]` <-> `[h, hd, D]`),
`SplitHeadsBias(h)` (`[h*hd]` <-> `[h, hd]`); a new one subclasses `Transform` (`mm_shape`, `to_mm`, `to_hf`).
Composite families reuse tables with prefixes: `llm_entries(config, hf_prefix="language_model.",
mm_prefix=("llm",))`. Register a new kind in `mm_dir.KINDS` (config section, parser, name map builder) so
`read_mm_config` / `load_mm_params` know it; the streaming loops in `pipeline` only use the NameMap API.
"""

from mm.convert.errors import ConversionError
from mm.convert.llm_map import llm_entries, llm_name_map
from mm.convert.mm_dir import (MM_CONFIG_FILE, PARAMS_DIR, TOKENIZER_DIR, load_mm_params, params_metadata,
                               read_mm_config, read_mm_manifest)
from mm.convert.name_map import Entry, NameMap, Transform
from mm.convert.pipeline import DTYPES, hf_to_mm, load_hf_llm, mm_to_hf
from mm.convert.safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter

__all__ = [
    "ConversionError", "DTYPES", "Entry", "MM_CONFIG_FILE", "NameMap", "PARAMS_DIR", "SafetensorsCheckpoint",
    "ShardedSafetensorsWriter", "TOKENIZER_DIR", "Transform", "hf_to_mm", "llm_entries", "llm_name_map",
    "load_hf_llm", "load_mm_params", "mm_to_hf", "params_metadata", "read_mm_config", "read_mm_manifest",
]
