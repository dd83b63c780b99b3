"""Conversations -> token ids with exact loss masks and image positions.

Masks are built from spans, never by re-tokenising and subtracting lengths (LLaVA's silent loss-0 bug,
DESIGN.md section 3). With the `chat` template the tokenizer's own chat template is rendered turn by turn:
for turn k the text `render(turns[:k+1])[len(render(turns[:k])):]` is that turn's span (for an assistant
turn the generation header `render(turns[:k], add_generation_prompt=True)` is split off first and stays
unsupervised). Each span is tokenised on its own and the spans are concatenated, so every token's owner is
known by construction. A template that does not render turn by turn as a string prefix is refused per
sample (`template_not_prefix`) rather than guessed at.

Supervised: the assistant body up to and including its last end-of-turn token (eos, `<|eot_id|>`,
`<|im_end|>`, ... or ids given); whitespace the template puts after it is not. `plain` (stage-1 alignment):
`[bos] <image> caption [eos]`, only caption and eos supervised; human text is ignored, as in LLaVA.

Each `<image>` in a turn becomes exactly `counts[k]` positions of `image_token_id`, marked in `image_mask`
(the model splices image features there, `mm.models.splice`). Rows whose images have no placeholder get
`<image>\\n` prepended to the first user turn (LLaVA's convention); any other count mismatch is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mm.data.skips import SampleSkip

IMAGE_PLACEHOLDER = "<image>"
# End-of-turn tokens of common chat templates (recognised when the tokenizer has them), besides eos.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass
class Encoded:
    """One tokenised sequence: ids, which tokens are predicted (`supervised`), which are image positions."""

    ids: np.ndarray  # int32 [n]
    supervised: np.ndarray  # bool [n]: token t is a target (the loss at t-1 predicts it)
    image_mask: np.ndarray  # bool [n]
    image_tokens: list[int]  # positions per image, in order
    image_starts: list[int]  # first position of each image's span

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def normalise_turns(turns: Any, rid: str) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)] with roles user/assistant/system; SampleSkip on bad input."""
    if not isinstance(turns, list) or not turns:
        raise SampleSkip("bad_row", rid, "'conversations' missing or empty")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            raise SampleSkip("bad_row", rid, f"turn {i} is not {{from, value: str}}")
        role = ROLES.get(str(t["from"]).lower())
        if role is None:
            raise SampleSkip("unknown_role", rid, f"turn {i} has role {t['from']!r}")
        out.append((role, t["value"]))
    if not any(r == "assistant" for r, _ in out):
        raise SampleSkip("no_assistant_turn", rid, "no gpt/assistant turn")
    return out


def place_images(turns: list[tuple[str, str]], num_images: int, rid: str) -> list[tuple[str, str]]:
    found = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if found == num_images:
        return turns
    if found == 0 and num_images > 0:
        first = next(i for i, (r, _) in enumerate(turns) if r == "user") if any(r == "user" for r, _ in turns) else None
        if first is not None:
            turns = list(turns)
            turns[first] = ("user", IMAGE_PLACEHOLDER * num_images + "\n" + turns[first][1])
            return turns
    raise SampleSkip("image_count_mismatch", rid, f"{found} '{IMAGE_PLACEHOLDER}' placeholders for {num_images} images")


def image_token_id_of(tokenizer: Any) -> int:
    """The id put at image positions: the tokenizer's `<image>` token if it has one, else its pad id (0 if
    none). Only `image_mask` marks image positions; the id is what a checkpoint records for them."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(tid if isinstance(tid, int) and tid != unk else (tokenizer.pad_token_id or 0))


class ConversationEncoder:
    """Tokenises conversations with a HF tokenizer (`chat`: its chat template; `plain`: stage-1 captions)."""

    def __init__(self, tokenizer: Any, template: str = "chat", image_token_id: int | None = None,
                 system_prompt: str | None = None, end_of_turn_ids: Sequence[int] = ()):
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' but the tokenizer has no chat_template (use 'plain' or set one)")
        self.tok = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.image_token_id = image_token_id_of(tokenizer) if image_token_id is None else int(image_token_id)
        self.end_of_turn = set(int(i) for i in (end_of_turn_ids or ()))
        if tokenizer.eos_token_id is not None:
            self.end_of_turn.add(int(tokenizer.eos_token_id))
        unk = getattr(tokenizer, "unk_token_id", None)
        for name in END_OF_TURN_TOKENS:
            tid = tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != unk:
                self.end_of_turn.add(tid)

    # -- pieces
    def _tokens(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _span(self, text: str, counts: list[int], ids: list[int], sup: list[bool], img: list[bool],
              supervise: bool) -> None:
        """Appends `text` (with `<image>` -> image positions, consuming `counts`) to the output lists."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        start = len(ids)
        for j, piece in enumerate(pieces):
            if j:
                n = counts.pop(0)
                ids += [self.image_token_id] * n
                sup += [False] * n
                img += [True] * n
            t = self._tokens(piece)
            ids += t
            sup += [False] * len(t)
            img += [False] * len(t)
        if supervise:  # body up to and including its last end-of-turn token (all of it when it has none)
            body = ids[start:]
            last = max((i for i, t in enumerate(body) if t in self.end_of_turn), default=len(body) - 1)
            for i in range(start, start + last + 1):
                sup[i] = not img[i]

    def _render(self, messages: list[dict[str, str]], gen: bool = False, rid: str = "?") -> str:
        if not messages:
            return ""
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja's raise_exception, templates indexing missing turns, ...
            raise SampleSkip("template_error", rid, f"chat template failed on {len(messages)} turns: "
                             f"{type(e).__name__}: {e}") from e

    # -- whole sequences
    def encode(self, turns: list[tuple[str, str]], image_tokens: Sequence[int], rid: str) -> Encoded:
        counts = list(int(c) for c in image_tokens)
        turns = place_images(turns, len(counts), rid)
        ids: list[int] = []
        sup: list[bool] = []
        img: list[bool] = []
        if self.template == "plain":
            caption = next(text for role, text in turns if role == "assistant").replace(IMAGE_PLACEHOLDER, "").strip()
            bos = getattr(self.tok, "bos_token_id", None)
            if bos is not None:
                ids, sup, img = [int(bos)], [False], [False]
            self._span(IMAGE_PLACEHOLDER * len(counts), counts, ids, sup, img, False)
            cap = self._tokens(caption) + [int(self.tok.eos_token_id)]
            ids += cap
            sup += [True] * len(cap)
            img += [False] * len(cap)
        else:
            messages = [{"role": r, "content": t} for r, t in turns]
            if self.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            prev = ""
            for k, m in enumerate(messages):
                full = self._render(messages[:k + 1], rid=rid)
                if m["role"] == "assistant":
                    head = self._render(messages[:k], gen=True, rid=rid)
                    if not head.startswith(prev) or not full.startswith(head):
                        raise SampleSkip("template_not_prefix", rid, f"chat template does not render turn {k} "
                                         "as an extension of the previous turns")
                    self._span(head[len(prev):], counts, ids, sup, img, False)
                    self._span(full[len(head):], counts, ids, sup, img, True)
                else:
                    if not full.startswith(prev):
                        raise SampleSkip("template_not_prefix", rid, f"chat template does not render turn {k} "
                                         "as an extension of the previous turns")
                    self._span(full[len(prev):], counts, ids, sup, img, False)
                prev = full
        starts, pos = [], 0
        mask = np.asarray(img, bool)
        for c in image_tokens:  # spans in order of appearance (adjacent images give adjacent spans)
            while not mask[pos]:
                pos += 1
            starts.append(pos)
            pos += int(c)
        return Encoded(np.asarray(ids, np.int32), np.asarray(sup, bool), mask, [int(c) for c in image_tokens], starts)


def truncate(enc: Encoded, max_len: int) -> Encoded:
    """Cuts to at most `max_len` tokens, never inside an image span: a span the cut would split is dropped
    whole (with its image, so features and positions stay paired)."""
    if len(enc) <= max_len:
        return enc
    cut = max_len
    for s, c in zip(enc.image_starts, enc.image_tokens):
        if s < cut < s + c:
            cut = s
    kept = sum(1 for s, c in zip(enc.image_starts, enc.image_tokens) if s + c <= cut)
    return Encoded(enc.ids[:cut], enc.supervised[:cut], enc.image_mask[:cut], enc.image_tokens[:kept],
                   enc.image_starts[:kept])
