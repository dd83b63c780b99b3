"""Built-in held-out scorers of a checkpoint on a LLaVA JSON split (higher is better), for `mm-soup`:

  loss         minus the token-weighted mean NLL of the split's answers (`mm.ppl.heldout_loss`: the training
               pipeline's template, images and packing); VLM checkpoints;
  exact-match  the fraction of the split's answers the model reproduces: every answer turn of every row,
               prompted with the row's earlier turns (and their reference answers) as history, greedy decoding,
               compared after `mm.answers.normalise` (case, spacing, a trailing full stop).

The split is named explicitly and must not be a test split: a file whose name has the word `test` (`test.json`,
`shapes_test.jsonl`) or that lies in a directory named `test` is refused. A scorer takes a checkpoint directory: an mm
VLM dir (IAA:
the `workflow` branch, "mm" by default; "text" is its frozen LLM) or an mm / HF LLM dir (text rows only).
Exact match tiles each row's image as LLaVA does (pad to a square, one tile of the tower's size; the tower's
HF preprocessor config when the checkpoint has one); rows with more than one image are skipped and counted.
Loaded handles are reused across scorer calls when the architecture is the same (only the params change), so
a greedy soup's many evaluations compile once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mm.config import ConfigError

SCORES = ("loss", "exact-match")
Scorer = Callable[[str], float]


def check_split(split: str | Path) -> Path:
    """The split's path, refusing a missing file or a test split (ConfigError naming it)."""
    p = Path(split)
    if not p.is_file():
        raise ConfigError(f"--split {split}: no such file (a LLaVA JSON / JSONL split)")
    stem_words = re.split(r"[^a-z0-9]+", p.name.lower().split(".")[0])
    if "test" in stem_words or p.resolve().parent.name.lower() == "test":
        raise ConfigError(f"--split {split}: looks like a test split; soups are chosen on a held-out validation "
                          "split, never the test split")
    return p


class Loader:
    """Loads checkpoints into one handle per architecture: the first load builds it, later loads of the same
    config swap in their params, so compiled functions are reused across evaluations."""

    def __init__(self) -> None:
        self.handle: Any = None

    def __call__(self, path: str | Path) -> Any:
        import mm

        h = mm.from_pretrained(path)
        if self.handle is None or type(self.handle) is not type(h) or self.handle.config != h.config:
            self.handle = h
        else:
            self.handle.params, self.handle.source = h.params, h.source
        return self.handle


def _questions(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, list[tuple[str, str]], str, str]], dict[str, int]]:
    """(row index, history, question, reference) of every answer turn, and skip counts by reason."""
    from mm.answers import answer_turns
    from mm.data.skips import SampleSkip
    from mm.data.sources import image_paths, row_id

    out, skips = [], {}
    for i, row in enumerate(rows):
        rid = row_id(row, i)
        try:
            if len(image_paths(row)) > 1:
                raise SampleSkip("too_many_images", rid, "exact match takes rows of at most one image")
            out += [(i, history, q, a) for history, q, a in answer_turns(row, rid)]
        except SampleSkip as e:
            skips[e.reason] = skips.get(e.reason, 0) + 1
    return out, skips


class ExactMatch:
    """`scorer(path) -> accuracy`; `last` holds the latest call's details (answers, skips)."""

    def __init__(self, split: str | Path, *, image_root: str | None = None, workflow: str = "mm",
                 max_new_tokens: int = 32, batch_size: int = 16, log: Callable[[str], None] = lambda _: None):
        from mm.data.sources import read_llava

        self.split = check_split(split)
        self.rows = read_llava(self.split)
        self.questions, self.skips = _questions(self.rows)
        if not self.questions:
            raise ConfigError(f"--split {split}: no row with a question and an answer (skips: {self.skips})")
        self.image_root, self.workflow = image_root, workflow
        self.max_new, self.batch, self.log = int(max_new_tokens), int(batch_size), log
        self.load = Loader()
        self._pixels: dict[tuple[int, str], dict[int, np.ndarray]] = {}
        self.last: dict[str, Any] = {}

    def _row_pixels(self, h: Any) -> dict[int, np.ndarray]:
        """Each image row's `[1, C, T, T]` tile for this handle's tower, computed once per tile size and
        processor (every checkpoint of a soup has one tower)."""
        from mm.data import images as img_lib
        from mm.data.pipeline import DataConfig, ImageTiler
        from mm.data.sources import image_paths, read_image, row_id
        from mm.ppl import processor_for

        size, processor = int(h.config.vision.image_size), processor_for(h)
        key = (size, repr(processor))
        if key not in self._pixels:
            tiler = ImageTiler(DataConfig(tiling="square", tile=size), processor)
            pixels = {}
            for i in sorted({q[0] for q in self.questions}):
                rel = image_paths(self.rows[i])
                if rel:
                    if self.image_root is None:
                        raise ConfigError(f"--split {self.split}: rows have images; pass --image-root")
                    data = read_image(self.image_root, rel[0], row_id(self.rows[i], i))
                    pixels[i] = tiler(img_lib.load_image(data, name=rel[0]))[0]
            self._pixels[key] = pixels
        return self._pixels[key]

    def __call__(self, path: str) -> float:
        from mm.answers import Prompter, decode, generate_all, normalise, stop_tokens
        from mm.api import VLMHandle

        h = self.load(path)
        tok = h.tokenizer
        if tok is None:
            raise ConfigError(f"{path}: no tokenizer beside the checkpoint (exact match decodes answers)")
        vlm = isinstance(h, VLMHandle)
        stops = stop_tokens(h)
        use_images = vlm and self.workflow != "text"
        pixels = self._row_pixels(h) if use_images else {}
        skips = dict(self.skips)
        qs = []
        for q in self.questions:
            if not use_images and _has_image(self.rows[q[0]]):
                skips["image_row_text_only"] = skips.get("image_row_text_only", 0) + 1
            else:
                qs.append(q)
        if not qs:
            raise ConfigError(f"--split {self.split}: every row has an image, but {path} scores text only")
        prompter = Prompter(tok, h.config.tokens_per_image if vlm else 0)
        gen = (lambda r, **k: h.generate(r, workflow=self.workflow, **k)) if vlm else h.generate
        answers: dict[int, str] = {}
        for with_image in (True, False):  # image rows with their tiles, text rows without (one call each)
            group = [k for k, q in enumerate(qs) if (q[0] in pixels) == with_image]
            if not group:
                continue
            prompts = [prompter(qs[k][2], with_image, h.image_token if vlm else -1, qs[k][1]) for k in group]
            px = [pixels[qs[k][0]] for k in group] if with_image else None
            toks = generate_all(gen, prompts, batch=self.batch, max_new=self.max_new, stops=stops, pixels=px,
                                desc=f"exact match / {Path(path).name}", log=self.log)
            answers.update(zip(group, decode(tok, toks, stops)))
        got = [answers[k] for k in range(len(qs))]
        correct = [normalise(a) == normalise(q[3]) for a, q in zip(got, qs)]
        self.last = {"path": str(path), "answers": got, "correct": correct, "skips": skips, "questions": len(qs)}
        return float(np.mean(correct))


def _has_image(row: dict[str, Any]) -> bool:
    from mm.data.sources import image_paths

    return bool(image_paths(row))


def make_scorer(kind: str, split: str | Path, *, image_root: str | None = None, workflow: str = "mm",
                max_new_tokens: int = 32, batch_size: int = 16) -> Scorer:
    """The built-in scorer `kind` ("loss" or "exact-match") on `split`; checks the split now, before any work."""
    if kind not in SCORES:
        raise ConfigError(f"--score {kind!r}: choose one of {SCORES}")
    if kind == "exact-match":
        return ExactMatch(split, image_root=image_root, workflow=workflow, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    split = check_split(split)
    load = Loader()

    def minus_loss(path: str) -> float:
        from mm.ppl import heldout_loss

        return -heldout_loss(load(path), str(split), image_root=image_root, workflow=workflow, batch_size=batch_size)

    return minus_loss
