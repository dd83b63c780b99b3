"""A model's answers to questions: prompts rendered as training renders conversations, greedy continuations in
batches, decoding up to the first stop token.

Prompts come from the training pipeline's own `ConversationEncoder` (the chat template, the text around
`<image>`), cut at the first token of the answer, with each image span collapsed to the single placeholder a
`VLMHandle` expands. Earlier turns of a conversation (with their reference answers) can precede the question.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass
class Prompter:
    """Token prompts for questions, rendered exactly as training renders a conversation up to an answer."""

    tokenizer: Any
    tokens_per_image: int
    template: str = "chat"

    def __post_init__(self) -> None:
        from mm.data.conversations import ConversationEncoder

        self.encoder = ConversationEncoder(self.tokenizer, self.template)

    def __call__(self, question: str, with_image: bool, image_token: int,
                 history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The prompt for `question`, after the `(question, answer)` turns of `history`; the image (one, when
        `with_image`) opens the conversation's first user turn, as in LLaVA rows."""
        pairs = [*history, (question, "x")]
        turns = []
        for k, (q, a) in enumerate(pairs):
            turns += [("user", ("<image>\n" if with_image and k == 0 else "") + q), ("assistant", a)]
        enc = self.encoder.encode(turns, [self.tokens_per_image] if with_image else [], "eval")
        sup = np.flatnonzero(enc.supervised)
        # the last answer's first token: the first supervised position after the previous answers' tokens
        first = int(sup[0]) if not history else int(sup[np.flatnonzero(np.diff(sup) > 1)[len(history) - 1] + 1])
        ids, img = enc.ids[:first].tolist(), enc.image_mask[:first]
        out: list[int] = []
        for k, (t, m) in enumerate(zip(ids, img)):
            if not m:
                out.append(int(t))
            elif k == 0 or not img[k - 1]:
                out.append(int(image_token))  # one placeholder per image span
        return out


def answer_turns(row: dict[str, Any], rid: str) -> list[tuple[list[tuple[str, str]], str, str]]:
    """`(history, question, answer)` of every answer turn of a LLaVA row, `history` being the earlier
    `(question, answer)` pairs; `<image>` markers and system turns dropped. SampleSkip (naming the row) when
    the row has no answer or its turns do not alternate user / assistant."""
    from mm.data.conversations import normalise_turns
    from mm.data.skips import SampleSkip

    turns = [(r, t.replace("<image>", "").strip()) for r, t in normalise_turns(row.get("conversations"), rid)
             if r != "system"]
    out: list[tuple[list[tuple[str, str]], str, str]] = []
    history: list[tuple[str, str]] = []
    for (r0, q), (r1, a) in zip(turns[::2], turns[1::2]):
        if (r0, r1) != ("user", "assistant"):
            raise SampleSkip("bad_row", rid, "turns must alternate user / assistant")
        out.append((list(history), q, a))
        history.append((q, a))
    return out


def stop_tokens(handle: Any, tokenizer: Any = None) -> list[int]:
    """What ends an answer: the tokenizer's eos and the model config's eos ids (LLM or VLM handle)."""
    tok = tokenizer if tokenizer is not None else handle.tokenizer
    cfg = handle.config.lm.llm if hasattr(handle.config, "lm") else handle.config
    return sorted({int(tok.eos_token_id)} | {int(x) for x in (cfg.eos_token_id or ())})


def normalise(text: str) -> str:
    """What exact match compares: lower case, single spaces, no trailing full stop."""
    return " ".join(text.strip().rstrip(".").split()).lower()


def until_stop(rows: Sequence[np.ndarray], stops: Sequence[int]) -> list[list[int]]:
    """Each generated row's tokens before its first stop token (what the model answered)."""
    out = []
    for row in rows:
        keep = []
        for t in np.asarray(row).tolist():
            if t in stops:
                break
            keep.append(t)
        out.append(keep)
    return out


def decode(tokenizer: Any, rows: Sequence[np.ndarray], stops: Sequence[int]) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in until_stop(rows, stops)]


def _batched(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def generate_all(gen: Callable[..., np.ndarray], prompts: list[list[int]], *, batch: int, max_new: int,
                 stops: Sequence[int], pixels: list[np.ndarray] | None = None, desc: str = "",
                 log: Callable[[str], None] = print, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> list[np.ndarray]:
    """Continuations of every prompt, `batch` at a time, with progress: greedy by default; with a
    `temperature`, sampled (nucleus `top_p`), batch k drawing from `seed + k`."""
    out: list[np.ndarray] = []
    t0 = time.perf_counter()
    sampling = {} if temperature == 0.0 else {"temperature": temperature, "top_p": top_p}
    for k, sl in enumerate(_batched(len(prompts), batch)):
        kw = {} if pixels is None else {"pixel_values": pixels[sl]}
        if sampling:
            kw.update(sampling, seed=seed + k)
        out += list(gen(prompts[sl], max_new_tokens=max_new, stop_tokens=list(stops), **kw))
        log(f"eval {desc}: {min(sl.stop, len(prompts))}/{len(prompts)} prompts ({time.perf_counter() - t0:.1f} s)")
    return out
