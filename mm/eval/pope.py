"""POPE (object hallucination, yes / no) in its release format: one JSON object a line,

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"}

in files named like `coco_pope_{random,popular,adversarial}.json[l]` (`--data` one file or a directory of
them; the split is the file name's last `_` part). Images are read from `--image-root`.

Answers parsed by `extract.pope_yes_no`; per split, with "yes" the positive class: accuracy, precision,
recall, F1 and the yes-ratio (the fraction answered "yes"), as fractions in [0, 1].
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from mm.config import ConfigError
from mm.eval.benchmarks import Benchmark, Item, data_files, ratio
from mm.eval.extract import pope_yes_no

SUFFIX = " Answer the question using a single word or phrase."  # *choice*: LLaVA-1.5's short-answer prompt


def read(data: str, image_root: str | None = None) -> list[Item]:
    items = []
    for f in data_files(data, (".json", ".jsonl")):
        split = f.stem.split("_")[-1]
        for k, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, image, text, label = row["question_id"], row["image"], row["text"], row["label"].lower()
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ConfigError(f"{f} line {k + 1}: not a POPE row (question_id, image, text, label): {e}") from e
            if label not in ("yes", "no"):
                raise ConfigError(f"{f} line {k + 1}: label {row['label']!r} is not yes / no")
            items.append(Item(f"{split}/{qid}", text + SUFFIX, image, {"split": split, "label": label}))
    return items


def metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(preds, labels))
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"accuracy": ratio(tp + tn, len(labels)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(tp + fp, len(labels)), "n": len(labels)}


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    splits = sorted({r["split"] for r in records})
    rows = []
    for s in splits:
        rs = [r for r in records if r["split"] == s]
        rows.append({"split": s, **metrics([pope_yes_no(r["prediction"]) for r in rs], [r["label"] for r in rs])})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("accuracy", "f1")} if rows else {}
    return {"metrics": {"mean_accuracy": mean.get("accuracy"), "mean_f1": mean.get("f1"), "questions": len(records)},
            "tables": {"splits": rows}}


BENCHMARK = Benchmark("pope", read, score, chart=("splits", "f1"), max_new_tokens=8)
