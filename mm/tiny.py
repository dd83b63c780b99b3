"""Tiny things made offline and deterministically: a BPE tokenizer with a chat template, and small HF configs.

Nothing in mm downloads weights, data or tokenizers; the quickstart, the tests and the benchmarks build what
they need here. The tokenizer follows Llama-3's conventions (`<|begin_of_text|>`, header tokens,
`<|eot_id|>`, an image placeholder `<|reserved_special_token_44|>`) so chat-template and label-mask code
paths are exercised the way a real Llama-3 checkpoint exercises them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Any, Iterable

from mm.config import IMAGE_TOKEN

SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    IMAGE_TOKEN, "<|pad|>",
)

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


@dataclasses.dataclass(frozen=True)
class TokenizerStyle:
    """The conventions of a tiny tokenizer: its special tokens (ids 0.. in this order), which of them are
    bos / eos / pad / unk / the image token, the chat template, and byte-level or Metaspace pre-tokenisation
    (Metaspace keeps characters outside the corpus as `unk`)."""

    special_tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    image: str
    chat_template: str
    unk: str | None = None
    byte_level: bool = True


# Llama-3's conventions (the quickstart, the demo, most tests of chat templates)
LLAMA3 = TokenizerStyle(SPECIAL_TOKENS, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|pad|>", image=IMAGE_TOKEN,
                        chat_template=CHAT_TEMPLATE)


@functools.lru_cache(maxsize=None)
def _trained(vocab_size: int, texts: tuple[str, ...], style: TokenizerStyle) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if style.byte_level:
        tok = Tokenizer(models.BPE(unk_token=style.unk))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        extra = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        tok = Tokenizer(models.BPE(unk_token=style.unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        extra = {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(style.special_tokens),
                                  show_progress=False, **extra)
    tok.train_from_iterator(list(texts), trainer)
    return tok.to_str()


def train_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None, style: TokenizerStyle = LLAMA3) -> Any:
    """A fresh BPE `PreTrainedTokenizerFast` trained on `texts` (default: `corpus()`) with `style`'s
    conventions; training runs once per (size, texts, style) in a process."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained(vocab_size, tuple(texts) if texts is not None else tuple(corpus()), style))
    names = {"bos_token": style.bos, "eos_token": style.eos, "pad_token": style.pad, "unk_token": style.unk}
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=[style.image],
                                   chat_template=style.chat_template,
                                   **{k: v for k, v in names.items() if v is not None})


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
