"""Tiny random HF decoder checkpoints (Llama, Qwen2) built from configs with torch, saved as safetensors.

Nothing is downloaded: weights are random (seeded), shapes are tiny. Variants cover what the converters and
model parity tests need: GQA, MHA, Llama-3.1 `llama3` RoPE scaling, Qwen2 q/k/v biases and tied embeddings.
Norm weights are randomised too (HF initialises them to ones, which would hide a mis-mapped norm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLAMA_VARIANTS = ("gqa", "mha", "llama3")
QWEN2_VARIANTS = ("tied", "untied")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def llama_config(variant: str = "gqa", **overrides: Any):
    from transformers import LlamaConfig

    if variant not in LLAMA_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {LLAMA_VARIANTS}")
    kw: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=False)
    if variant == "mha":
        kw["num_key_value_heads"] = 4
    if variant == "llama3":
        # Short original context so the scaled (low and medium frequency) bands are exercised at T >= 256.
        kw.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
    kw.update(overrides)
    return LlamaConfig(**kw)


def qwen2_config(variant: str = "tied", **overrides: Any):
    from transformers import Qwen2Config

    if variant not in QWEN2_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {QWEN2_VARIANTS}")
    kw: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=variant == "tied", use_sliding_window=False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def save_model(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32,
               max_shard_size: str | int | None = None, tokenizer: bool = False) -> Path:
    """`save_pretrained` (safetensors) in `dtype`; optionally with the tiny test tokenizer beside it."""
    path = Path(path)
    model = model.to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    if tokenizer:
        from tests.helpers.tokenizer import make_tokenizer

        make_tokenizer().save_pretrained(str(path))
    return path


def make_llama(tmp_path: Path, variant: str = "gqa", dtype: torch.dtype = torch.float32, seed: int = 0,
               max_shard_size: str | int | None = None, tokenizer: bool = False, **overrides: Any) -> Path:
    """A tiny random `LlamaForCausalLM` saved under `tmp_path/llama-{variant}`; returns the directory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(variant, **overrides)).eval()
    _randomise(model, seed)
    return save_model(model, Path(tmp_path) / f"llama-{variant}", dtype, max_shard_size, tokenizer)


def make_qwen2(tmp_path: Path, variant: str = "tied", dtype: torch.dtype = torch.float32, seed: int = 0,
               max_shard_size: str | int | None = None, tokenizer: bool = False, **overrides: Any) -> Path:
    """A tiny random `Qwen2ForCausalLM` (q/k/v biases) saved under `tmp_path/qwen2-{variant}`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(variant, **overrides)).eval()
    _randomise(model, seed)
    return save_model(model, Path(tmp_path) / f"qwen2-{variant}", dtype, max_shard_size, tokenizer)


def make_model(tmp_path: Path, family_variant: str, **kw: Any) -> Path:
    """`"llama-gqa"`, `"llama-llama3"`, `"qwen2-tied"`, ... -> the saved directory."""
    family, variant = family_variant.split("-", 1)
    return {"llama": make_llama, "qwen2": make_qwen2}[family](tmp_path, variant, **kw)


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The saved model back as an eval-mode `AutoModelForCausalLM` (eager attention, `dtype`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()
