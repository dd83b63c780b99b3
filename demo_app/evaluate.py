"""Evaluates exported demo checkpoints through `mm.from_pretrained`, the way a user would load them.

Prompts and decoding are `mm.answers`' (the training pipeline's template; greedy); pixels come from the
pipeline's own `ImageTiler`; answers are scored by the shapes data's own rules (`shapes.answer_correct`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mm.answers import Prompter, decode, generate_all  # noqa: F401 - the demo's API
from demo_app import shapes


def answer_items(h: Any, items: Sequence[shapes.MMItem], pixels: list[np.ndarray], prompter: Prompter, *,
                 tokenizer: Any, desc: str, **kw: Any) -> list[str]:
    """A VLM handle's greedy answers (its `mm` workflow) to each item's question about its image; `kw` as for
    `generate_all` (batch, max_new, stops, log)."""
    prompts = [prompter(it.question, True, h.image_token) for it in items]
    toks = generate_all(lambda r, **k: h.generate(r, workflow="mm", **k), prompts, pixels=pixels, desc=desc, **kw)
    return decode(tokenizer, toks, kw["stops"])


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
