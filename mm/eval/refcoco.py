"""RefCOCO / RefCOCO+ / RefCOCOg-format grounding: one referring expression a row, as the refer toolkit's
refs flattened with their COCO annotation (JSON list or JSONL; `--data` one file or a directory of them, the
file's stem naming the split, e.g. `refcoco_testA.jsonl`):

    {"image": "COCO_train2014_000000580957.jpg", "sent": "left man", "bbox": [x, y, w, h], "id": ...}

`bbox` is COCO's [x, y, width, height] in pixels of the original image; `sentence` / `expression` are
accepted for `sent`, `file_name` for `image`. Images are read from `--image-root`.

The model is asked with IAA's grounding prompt (`mm.grounding.grounding_prompt`) and answers a box normalised
on the padded square; its first box is mapped to the original image (`mm.grounding.from_padded_square`,
with the image's size as the runner read it) and is right when its IoU with the reference is >= 0.5
(Acc@0.5 per split, in [0, 1]; no box is a miss).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from mm import grounding
from mm.config import ConfigError
from mm.eval.benchmarks import Benchmark, Item, data_files, ratio


def _rows(f: Path) -> list[Any]:
    text = f.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not a JSON list or JSONL file ({e})") from e


def read(data: str, image_root: str | None = None) -> list[Item]:
    items = []
    for f in data_files(data, (".json", ".jsonl")):
        for k, row in enumerate(_rows(f)):
            sent = next((row[c] for c in ("sent", "sentence", "expression") if c in row), None)
            image = row.get("image", row.get("file_name"))
            box = row.get("bbox")
            if sent is None or image is None or not (isinstance(box, list) and len(box) == 4):
                raise ConfigError(f"{f} row {k}: needs image (or file_name), sent (or sentence / expression) and "
                                  "bbox [x, y, w, h]")
            x, y, w, h = (float(v) for v in box)
            items.append(Item(f"{f.stem}/{row.get('id', k)}", grounding.grounding_prompt(sent), image,
                              {"split": f.stem, "box": [x, y, x + w, y + h]}))
    return items


def hit(prediction: str, box: Sequence[float], width: int, height: int, threshold: float = 0.5) -> tuple[bool, Any]:
    """(IoU >= threshold, the predicted box in original pixels or None) for one answer."""
    boxes = grounding.parse_boxes(prediction)
    if not boxes:
        return False, None
    pred = grounding.from_padded_square(boxes[0], width, height)
    return grounding.iou(pred, tuple(box)) >= threshold, list(pred)


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for s in sorted({r["split"] for r in records}):
        rs = [r for r in records if r["split"] == s]
        hits = sum(hit(r["prediction"], r["box"], *r["image_size"])[0] for r in rs)
        rows.append({"split": s, "n": len(rs), "acc@0.5": ratio(hits, len(rs))})
    total = sum(r["n"] for r in rows)
    return {"metrics": {"acc@0.5": ratio(sum(r["acc@0.5"] * r["n"] for r in rows), total), "questions": total},
            "tables": {"splits": rows}}


BENCHMARK = Benchmark("refcoco", read, score, chart=("splits", "acc@0.5"), workflow="g", max_new_tokens=32)
