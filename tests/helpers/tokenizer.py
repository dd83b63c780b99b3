"""A tiny BPE tokenizer trained offline, wrapped as a `PreTrainedTokenizerFast` with a chat template.

Vocabulary size 128 by default (matches the tiny models in `tests.helpers.hf_models`): ids 0-4 are `<pad>`,
`<s>`, `</s>`, `<unk>`, `<image>`; the rest are characters and merges learned (Metaspace pre-tokenisation,
so decoding restores spaces) from a fixed in-code corpus: deterministic, no download. Characters outside
the corpus map to `<unk>`.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=None)
def _trained(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 128):
    """A fresh `PreTrainedTokenizerFast` (pad 0, bos 1, eos 2, unk 3, `<image>` 4) with `CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<image>"], chat_template=CHAT_TEMPLATE)
