"""The decoder-LLM family (Llama, Qwen2): HF `LlamaForCausalLM` / `Qwen2ForCausalLM` directories <-> mm "llm"
directories and `mm.models.llm.LLM` params (per-layer layout).

`prefix` / `mm_prefix` let composite families reuse the table for an LLM nested in a bigger model (e.g. the
LLaVA / IAA base LLM under other names). Tied models (`tie_word_embeddings`) have no `lm_head`; an
`lm_head.weight` in a tied HF checkpoint is ignored on import (transformers ties it to the embedding anyway).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import convert, kept_dtype_name
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import (IDENTITY, TRANSPOSE, Entry, MMPath, NameMap, SplitHeadsBias, SplitHeadsIn,
                                     SplitHeadsOut)
from mm.checkpoints.readers import SafetensorsReader
from mm.checkpoints.writers import SafetensorsWriter
from mm.config import ConfigError, LLMConfig, read_json
from mm.convert.family import Family, Opened


def llm_entries(c: LLMConfig, hf_prefix: str = "", mm_prefix: MMPath = ()) -> list[Entry]:
    """The entries of one decoder LLM in canonical order."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    hq, hkv = c.num_heads, c.num_kv_heads
    m = f"{hf_prefix}model."

    def e(name: str, shape: tuple[int, ...], path: MMPath, t=IDENTITY) -> Entry:
        return Entry(name, shape, mm_prefix + path, t)

    out = [e(f"{m}embed_tokens.weight", (c.vocab_size, d), ("embed_tokens", "embedding"))]
    for i in range(c.num_layers):
        L, p = f"{m}layers.{i}.", (f"layers_{i}",)
        attn = p + ("self_attn",)
        for proj, heads in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
            out.append(e(f"{L}self_attn.{proj}.weight", (heads * hd, d), attn + (proj, "kernel"), SplitHeadsIn(heads)))
            if c.attention_bias:
                out.append(e(f"{L}self_attn.{proj}.bias", (heads * hd,), attn + (proj, "bias"), SplitHeadsBias(heads)))
        out.append(e(f"{L}self_attn.o_proj.weight", (d, hq * hd), attn + ("o_proj", "kernel"), SplitHeadsOut(hq)))
        for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            out.append(e(f"{L}mlp.{proj}.weight", shape, p + ("mlp", proj, "kernel"), TRANSPOSE))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append(e(f"{L}{norm}.weight", (d,), p + (norm, "scale")))
    out.append(e(f"{m}norm.weight", (d,), ("norm", "scale")))
    if not c.tie_word_embeddings:
        out.append(e(f"{hf_prefix}lm_head.weight", (c.vocab_size, d), ("lm_head", "kernel"), TRANSPOSE))
    return out


def llm_ignorable(c: LLMConfig, hf_prefix: str = "") -> list[str]:
    """Regexes of HF names dropped on import: RoPE buffers some exporters save, and a tied model's head."""
    hp = re.escape(hf_prefix)
    pats = [rf"{hp}model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", rf"{hp}model\.rotary_emb\.inv_freq"]
    if c.tie_word_embeddings:
        pats.append(rf"{hp}lm_head\.weight")
    return pats


def llm_name_map(config: LLMConfig) -> NameMap:
    """The name map of a plain HF causal LM checkpoint."""
    return NameMap(llm_entries(config), llm_ignorable(config))


def read_hf_llm_config(hf_dir: str | Path, **runtime: Any) -> LLMConfig:
    path = Path(hf_dir) / "config.json"
    try:
        return LLMConfig.from_hf_dict(read_json(path), source=str(path), **runtime)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    except KeyError as e:
        raise ConversionError(f"{path}: missing key {e}") from e


def tokenizer_dir_of(directory: Path) -> Path | None:
    """Where a checkpoint directory keeps its tokenizer files: `tokenizer/` (mm dirs), itself (HF dirs)."""
    for d in (directory / mmd.TOKENIZER_DIR, directory):
        if any((d / f).is_file() for f in mmd.TOKENIZER_FILES):
            return d
    return None


def open_hf(directory: Path) -> Opened:
    config = read_hf_llm_config(directory)
    return Opened(FAMILY, config, SafetensorsReader(directory), llm_name_map(config), directory,
                  tokenizer_dir_of(directory))


def hf_torch_dtype(dtypes: Any) -> str:
    """config.json's dtype for tensors written in `dtypes` (float32 when they differ)."""
    name = kept_dtype_name(list(dtypes))
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def write_hf(opened: Opened, stage: Path, dst: Path, dtype: str, max_shard_bytes: int, progress: bool
             ) -> None:
    """An mm "llm" directory as an HF causal-LM directory (config, generation config, tokenizer, safetensors)."""
    config, src = opened.config, opened.directory
    writer = SafetensorsWriter(stage, max_shard_bytes)
    convert(opened.reader, llm_name_map(config), writer, dtype=dtype, progress=progress, desc="mm-to-hf")
    torch_dtype = hf_torch_dtype(p.dtype for p in writer.plan)
    (stage / "config.json").write_text(json.dumps(config.to_hf_dict(torch_dtype=torch_dtype), indent=2) + "\n")
    if not mmd.copy_files(src, stage, mmd.EXTRA_HF_FILES):
        gen = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
               "eos_token_id": list(config.eos_token_id) if len(config.eos_token_id) != 1
               else config.eos_token_id[0]}
        (stage / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    mmd.copy_files(src / mmd.TOKENIZER_DIR, stage, mmd.TOKENIZER_FILES)


FAMILY = Family(
    name="LLM (Llama / Qwen2)", handle="llm", kind="llm", name_map=llm_name_map,
    parse=lambda d, source: LLMConfig.from_json_dict(d, source=source), to_json=lambda c: c.to_json_dict(),
    with_param_dtype=lambda c, dt: c.replace(param_dtype=dt), open_hf=open_hf, write_hf=write_hf,
    hf_files=mmd.EXTRA_HF_FILES)
