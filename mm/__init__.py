"""mm: vision-language models on a frozen LLM (Inner-Adaptor Architecture), in JAX/Flax.

Public entry point: `mm.from_pretrained(path)` loads an HF (Llama / Qwen2) or mm checkpoint directory and
returns a handle with `logits(input_ids)` and `generate(input_ids, ...)`.
"""

from mm.api import LLMHandle, from_pretrained

__all__ = ["LLMHandle", "from_pretrained"]
__version__ = "0.1.0"
