"""Tiny things made offline and deterministically: a BPE tokenizer with a chat template, and small HF configs.

Nothing in mm downloads weights, data or tokenizers; the quickstart, the tests and the benchmarks build what
they need here. The tokenizer follows Llama-3's conventions (`<|begin_of_text|>`, header tokens,
`<|eot_id|>`, an image placeholder `<|reserved_special_token_44|>`) so chat-template and label-mask code
paths are exercised the way a real Llama-3 checkpoint exercises them.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable

SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|reserved_special_token_44|>", "<|pad|>",
)
IMAGE_TOKEN = "<|reserved_special_token_44|>"

# Llama-3-style chat template (written for mm; renders system/user/assistant turns, optional generation prompt).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
_SHAPES = ("circle", "square", "triangle", "star")
_WHERE = ("left of", "right of", "above", "below")


def corpus() -> list[str]:
    """A few thousand short English sentences about shapes, colours, counts and arithmetic."""
    lines = []
    for (c1, s1), (c2, s2) in itertools.product(itertools.product(_COLOURS, _SHAPES), repeat=2):
        w = _WHERE[(len(c1) + len(s2)) % len(_WHERE)]
        lines.append(f"The {c1} {s1} is {w} the {c2} {s2}.")
    for a, b in itertools.product(range(0, 40, 3), range(0, 40, 7)):
        lines.append(f"What is {a} plus {b}? The answer is {a + b}.")
    for n, s in itertools.product(range(1, 10), _SHAPES):
        lines.append(f"There are {n} {s}s in the picture. Please describe the image in detail.")
    return lines


def train_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (default: `corpus()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_hf_config(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """A small Llama-3.1-shaped HF config dict (GQA, llama3 RoPE scaling); `overrides` win."""
    cfg: dict[str, Any] = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size, hidden_size=64,
        intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=4,
        pad_token_id=6)
    cfg.update(overrides)
    return cfg


def save_tokenizer(tokenizer: Any, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))
