"""A tiny BPE tokenizer trained offline, wrapped as a `PreTrainedTokenizerFast` with a chat template.

Vocabulary size 128 by default (matches the tiny models in `tests.helpers.hf_models`): ids 0-4 are `<pad>`,
`<s>`, `</s>`, `<unk>`, `<image>`; the rest are characters and merges learned (Metaspace pre-tokenisation,
so decoding restores spaces) from a fixed in-code corpus: deterministic, no download. Characters outside
the corpus map to `<unk>`. Built by the one tokenizer builder, `mm.tiny.train_tokenizer`.
"""

from __future__ import annotations

from mm import tiny

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a picture of a cat sitting on a red mat",
    "user: what is in the image? assistant: a dog playing in the park",
    "describe the scene in one sentence please",
    "there are two people and a bicycle near the river",
    "the answer is 42 and the box is [0.1, 0.2, 0.5, 0.9]",
] * 20
STYLE = tiny.TokenizerStyle(SPECIAL_TOKENS, bos="<s>", eos="</s>", pad="<pad>", image="<image>",
                            chat_template=CHAT_TEMPLATE, unk="<unk>", byte_level=False)


def make_tokenizer(vocab_size: int = 128):
    """A fresh `PreTrainedTokenizerFast` (pad 0, bos 1, eos 2, unk 3, `<image>` 4) with `CHAT_TEMPLATE`
    (`mm.tiny.train_tokenizer` in this module's `STYLE`)."""
    return tiny.train_tokenizer(vocab_size, _CORPUS, STYLE)
