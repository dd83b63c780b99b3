"""Evaluates exported demo checkpoints through `mm.from_pretrained`, the way a user would load them.

Prompts are rendered by the training pipeline's own `ConversationEncoder` (so the chat template and the
text around `<image>` match training) up to the first answer token, with each image span collapsed to the
single placeholder the handle expands; pixels come from the pipeline's own `ImageTiler`. Decoding is greedy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mm.demo import shapes


@dataclasses.dataclass
class Prompter:
    """Token prompts for questions, rendered exactly as training renders a conversation's first turn."""

    tokenizer: Any
    tokens_per_image: int

    def __post_init__(self) -> None:
        from mm.data.conversations import ConversationEncoder

        self.encoder = ConversationEncoder(self.tokenizer, "chat")

    def __call__(self, question: str, with_image: bool, image_token: int) -> list[int]:
        turns = [("user", ("<image>\n" if with_image else "") + question), ("assistant", "x")]
        enc = self.encoder.encode(turns, [self.tokens_per_image] if with_image else [], "eval")
        first = int(np.flatnonzero(enc.supervised)[0])
        ids, img = enc.ids[:first].tolist(), enc.image_mask[:first]
        out: list[int] = []
        for k, (t, m) in enumerate(zip(ids, img)):
            if not m:
                out.append(int(t))
            elif k == 0 or not img[k - 1]:
                out.append(int(image_token))  # one placeholder per image span
        return out


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
                 log: Callable[[str], None] = print) -> list[np.ndarray]:
    """Greedy continuations of every prompt, `batch` at a time, with progress."""
    out: list[np.ndarray] = []
    t0 = time.perf_counter()
    for k, sl in enumerate(_batched(len(prompts), batch)):
        kw = {} if pixels is None else {"pixel_values": pixels[sl]}
        out += list(gen(prompts[sl], max_new_tokens=max_new, stop_tokens=list(stops), **kw))
        log(f"eval {desc}: {min(sl.stop, len(prompts))}/{len(prompts)} prompts ({time.perf_counter() - t0:.1f} s)")
    return out


def load_pixels(items: Sequence[shapes.MMItem], image_root: str, tiler: Any) -> list[np.ndarray]:
    """`[1, C, T, T]` per item (one square tile, as training saw it)."""
    from mm.data import images as img_lib

    cache: dict[str, np.ndarray] = {}
    out = []
    for it in items:
        if it.image not in cache:
            px, _ = tiler(img_lib.load_image(str(Path(image_root) / it.image)))
            cache[it.image] = px
        out.append(cache[it.image])
    return out


def score_mm(items: Sequence[shapes.MMItem], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy per question kind, `qa` over colour/shape/count/position, `grounding_acc@0.5`."""
    correct = [shapes.answer_correct(it, a) for it, a in zip(items, answers)]
    out: dict[str, float] = {}
    for kind in shapes.QA_KINDS + ("grounding",):
        got = [c for it, c in zip(items, correct) if it.kind == kind]
        if got:
            out[kind] = float(np.mean(got))
    qa = [c for it, c in zip(items, correct) if it.kind in shapes.QA_KINDS]
    out["qa"] = float(np.mean(qa)) if qa else 0.0
    out["grounding_acc@0.5"] = out.pop("grounding", 0.0)
    return out
