"""Name map of the decoder LLM (Llama family, Qwen2): HF `LlamaForCausalLM` / `Qwen2ForCausalLM` tensors <->
`mm.models.llm.LLM` params (per-layer layout).

`prefix` / `mm_prefix` let composite families reuse the table for an LLM nested in a bigger model (e.g. the
LLaVA / IAA base LLM under other names). Tied models (`tie_word_embeddings`) have no `lm_head`; an
`lm_head.weight` in a tied HF checkpoint is ignored on import (transformers ties it to the embedding anyway).
"""

from __future__ import annotations

import re

from mm.config import LLMConfig
from mm.convert.name_map import (IDENTITY, TRANSPOSE, Entry, MMPath, NameMap, SplitHeadsBias, SplitHeadsIn,
                                 SplitHeadsOut)


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
