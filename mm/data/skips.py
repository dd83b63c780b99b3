"""Why a sample was dropped, and the counters that make dropped data visible.

Bad rows never crash a run: every problem found while turning a row into a training example raises
`SampleSkip(reason, row_id, message)`; the pipeline catches it, counts it under `reason` and logs the first
few with their row ids. A run whose data is mostly broken must not train on nothing silently either:
`SkipCounter.check` raises `DataError` (naming examples) once the skipped fraction passes a ceiling.
"""

from __future__ import annotations

import dataclasses
from absl import logging
from typing import Iterable, Mapping


# Every reason a sample can be skipped for (metric names are `data/skipped/<reason>`).
REASONS = (
    "bad_row",  # not a dict, no conversations, a turn without from/value ...
    "unknown_role",  # a turn whose `from` is none of human/user/gpt/assistant/system
    "no_assistant_turn",  # nothing to supervise
    "missing_image",  # the file does not exist under the image root
    "path_escape",  # absolute path, `..`, or a symlink leading out of the image root
    "corrupt_image",  # undecodable, truncated, absurd size
    "image_count_mismatch",  # number of `<image>` placeholders != number of images
    "template_not_prefix",  # the chat template does not render turn by turn (cannot build exact masks)
    "template_error",  # the chat template raised for this conversation (e.g. roles out of the order it wants)
    "too_many_tiles",  # more image tiles than one batch row can hold
    "no_supervised_tokens",  # after templating and truncation, not one token carries loss
)


class DataError(RuntimeError):
    """The data as a whole is unusable (e.g. the skipped fraction is over the configured ceiling)."""


class SampleSkip(Exception):
    """One sample cannot be used; carries the reason (one of `REASONS`) and the row id."""

    def __init__(self, reason: str, row_id: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{row_id}: {reason}: {message}")
        self.reason, self.row_id, self.message = reason, str(row_id), message


@dataclasses.dataclass
class SkipCounter:
    """Counts used and skipped samples by reason; keeps the first `keep_examples` skips for messages."""

    max_skip_fraction: float = 0.5
    min_samples: int = 100  # the ceiling is only checked once this many samples have been seen
    keep_examples: int = 5
    used: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in REASONS})
    examples: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (reason, id, message)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add_skip(self, reason: str, row_id: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append((reason, str(row_id), message))
            logging.warning("data: skipping sample %s (%s): %s", row_id, reason, message)
        if reason == "no_supervised_tokens":  # the LLaVA failure mode: always say it
            logging.warning("data: sample %s has no supervised token after templating/truncation; dropped", row_id)

    def merge(self, used: int, counts: Mapping[str, int], examples: Iterable[tuple[str, str, str]]) -> None:
        self.used += int(used)
        for r, n in counts.items():
            self.counts[r] += int(n)
        for e in examples:
            if len(self.examples) < self.keep_examples:
                self.examples.append(tuple(e))

    def check(self) -> None:
        total = self.used + self.skipped
        if total < self.min_samples or total == 0:
            return
        frac = self.skipped / total
        if frac > self.max_skip_fraction:
            top = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items(), key=lambda x: -x[1]) if n)
            ex = "; ".join(f"{i} ({r}: {m})" for r, i, m in self.examples)
            raise DataError(f"data: {self.skipped} of {total} samples skipped ({frac:.1%} > max_skip_fraction "
                            f"{self.max_skip_fraction:.1%}); by reason: {top}; for example: {ex}")

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped/{r}": float(n) for r, n in self.counts.items()}
        out["data/used"] = float(self.used)
        out["data/skipped"] = float(self.skipped)
        return out

    def state(self) -> dict:
        return {"used": self.used, "counts": dict(self.counts), "examples": [list(e) for e in self.examples]}

    def restore(self, state: Mapping) -> None:
        self.used = int(state["used"])
        self.counts = {r: int(state["counts"].get(r, 0)) for r in REASONS}
        self.examples = [tuple(e) for e in state["examples"]]
