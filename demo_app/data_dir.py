"""Writes all of the demo's data into one directory, deterministically from the config's seed.

    DATA/tokenizer/            byte-level BPE trained on the demo's own text (`mm.tiny.train_tokenizer`)
    DATA/text/{train,eval}.json    the text task (word reversal) as text-only LLaVA JSON rows
    DATA/text/eval_items.json      held-out prompts and reference answers
    DATA/shapes/images/*.png, DATA/shapes/{train,eval}.json, DATA/shapes/eval_items.json
    DATA/shapes/{train,eval}_ar/   the same rows packed to ArrayRecord (`mm.data.pack`): what training reads

A real checkpoint's tokenizer can replace the generated one (`tokenizer=`); the rows do not change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from demo_app import shapes, text_task


@dataclasses.dataclass(frozen=True)
class DemoData:
    root: str
    tokenizer: str
    text_train: str
    text_eval: str
    text_items: list[text_task.TextItem]
    mm_train: str  # ArrayRecord dir
    mm_eval: str
    image_root: str
    mm_items: list[shapes.MMItem]


def _texts(text_items: list[text_task.TextItem], mm_json: str) -> list[str]:
    out = [x for it in text_items for x in (it.prompt, it.answer)]
    for row in json.loads(Path(mm_json).read_text()):
        out += [t["value"].replace("<image>\n", "") for t in row["conversations"]]
    return out


def layout(root: str | Path) -> dict[str, Path]:
    """Where `write_demo_data(root, ...)` puts each thing (the stage configs read them from here)."""
    r = Path(root)
    return {"text_train": r / "text" / "train.json", "text_eval": r / "text" / "eval.json",
            "text_items": r / "text" / "eval_items.json", "shapes": r / "shapes", "images": r / "shapes" / "images",
            "mm_train": r / "shapes" / "train_ar", "mm_eval": r / "shapes" / "eval_ar", "tokenizer": r / "tokenizer"}


def write_demo_data(root: str | Path, d: Any, *, seed: int, tokenizer: str = "", log: Any = print) -> DemoData:
    """`d` is the demo config's `data` section. Reuses nothing: callers pass a fresh directory or accept that
    files are rewritten (the content is a pure function of the config)."""
    from mm.data.pack import pack_llava, summary

    at = layout(root)
    at["text_train"].parent.mkdir(parents=True, exist_ok=True)
    train, held = text_task.splits(int(d.text_train), int(d.text_eval), seed=seed)
    at["text_train"].write_text(json.dumps(text_task.llava_rows(train, "text")))
    at["text_eval"].write_text(json.dumps(text_task.llava_rows(held, "textheld")))
    at["text_items"].write_text(json.dumps([dataclasses.asdict(x) for x in held]))
    log(f"data: text task {len(train)} train / {len(held)} held-out rows -> {at['text_train'].parent}")

    sd = shapes.write(at["shapes"], int(d.mm_train_images), int(d.mm_eval_images), seed=seed,
                      min_side=int(d.min_side), max_side=int(d.max_side), max_objects=int(d.max_objects),
                      train_kinds=tuple(d.train_kinds), rounds=tuple(d.rounds),
                      scale=tuple(d.object_scale), max_aspect=float(d.max_aspect),
                      grounding_rate=float(d.grounding_rate))
    log(f"data: shapes {d.mm_train_images} train / {d.mm_eval_images} held-out images, "
        f"{len(sd.eval_items)} held-out questions -> {at['shapes']}")
    for split, path in (("train", sd.train_json), ("eval", sd.eval_json)):
        out = at[f"mm_{split}"]
        _, counter = pack_llava(path, sd.image_root, str(out), progress=False, prefix=split)
        log(f"data: packed {split}: {summary(counter).splitlines()[0]} -> {out}")
        if counter.skipped:
            raise ValueError(f"{path}: {counter.skipped} generated rows failed their checks:\n{summary(counter)}")

    if tokenizer:
        tok_dir = tokenizer
    else:
        from mm.tiny import train_tokenizer

        tok_dir = str(at["tokenizer"])
        tok = train_tokenizer(int(d.vocab_size), _texts(train, sd.train_json))
        tok.save_pretrained(tok_dir)
        log(f"data: tokenizer ({len(tok)} tokens) -> {tok_dir}")
    return DemoData(str(root), tok_dir, str(at["text_train"]), str(at["text_eval"]), held, str(at["mm_train"]),
                    str(at["mm_eval"]), sd.image_root, sd.eval_items)
