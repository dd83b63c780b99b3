"""The demo's text task: reverse a list of words. Deterministic from a seed, with a disjoint held-out split.

A skill the base LLM learns first and the multimodal data never exercises, so training the LLM on images can
erase it. Scoring is exact match of the generated answer (whitespace-normalised) against the reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mm.answers import normalise

WORDS = ("sun", "moon", "tree", "river", "stone", "cloud", "bird", "fish", "apple", "bread", "lamp", "chair",
         "door", "key", "ship", "star", "wolf", "bear", "rain", "snow", "fire", "leaf", "rock", "hill")
PROMPT = "Reverse the words: {words}"


@dataclasses.dataclass(frozen=True)
class TextItem:
    prompt: str
    answer: str


def _sequences(rng: np.random.Generator, n: int, lengths: tuple[int, int], exclude: set[tuple[str, ...]]
               ) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    seen = set(exclude)
    while len(out) < n:
        k = int(rng.integers(lengths[0], lengths[1] + 1))
        words = tuple(str(w) for w in rng.choice(WORDS, k))
        if words not in seen:
            seen.add(words)
            out.append(words)
    return out


def item(words: tuple[str, ...]) -> TextItem:
    return TextItem(PROMPT.format(words=" ".join(words)), " ".join(reversed(words)))


def splits(n_train: int, n_eval: int, seed: int = 0, lengths: tuple[int, int] = (3, 6)
           ) -> tuple[list[TextItem], list[TextItem]]:
    """(train, held-out) items; no held-out word sequence occurs in the training split."""
    rng = np.random.default_rng([seed, 17])
    held = _sequences(rng, n_eval, lengths, set())
    train = _sequences(rng, n_train, lengths, set(held))
    return [item(w) for w in train], [item(w) for w in held]


def llava_rows(items: list[TextItem], prefix: str = "text") -> list[dict]:
    """Text-only LLaVA JSON rows (one user turn, one assistant turn)."""
    return [{"id": f"{prefix}{i:06d}", "conversations": [{"from": "human", "value": it.prompt},
                                                         {"from": "gpt", "value": it.answer}]}
            for i, it in enumerate(items)]


def exact_match(predictions: list[str], items: list[TextItem]) -> float:
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        return 0.0
    return sum(normalise(p) == normalise(it.answer) for p, it in zip(predictions, items)) / len(items)
