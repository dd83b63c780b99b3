"""MMBench (multiple choice) in its release format: a TSV with a header row and the columns

    index  question  hint  A  B  C  D  answer  category  image  [l2-category  source  split ...]

`image` is the base64 of the encoded image (MMBench's own convention: a row whose `image` is a bare number
reuses the image of the row with that index). Options are the non-empty letter columns (up to E in some
versions); `hint` may be empty ("nan" counts as empty, as pandas writes it).

**Circular evaluation**: a question with n options is asked n times, its options rotated by 0..n-1 places
(the answer letter moving with them), and counts as right only if every rotation is answered right. A TSV that
already holds the rotations (MMBench's circular files: copies with `index` + k * 1,000,000) is used as it
is, grouped by `index % 1,000,000`. Answers are read with `extract.option_letter`. The summary has the
circular accuracy (overall, per category and per l2-category when present) and the accuracy of the
unrotated questions alone ("vanilla"), both in [0, 1].
"""

from __future__ import annotations

import base64
import binascii
import csv
import string
import sys
from typing import Any, Sequence

from mm.config import ConfigError
from mm.eval.benchmarks import Benchmark, Item, data_files, ratio
from mm.eval.extract import option_letter

GROUP = 1_000_000
SUFFIX = "Answer with the option's letter from the given choices directly."  # *choice*: LLaVA-1.5's prompt


def _empty(v: Any) -> bool:
    return v is None or str(v).strip() in ("", "nan", "NaN", "None")


def prompt(question: str, hint: str | None, options: dict[str, str]) -> str:
    head = "" if _empty(hint) else f"{hint}\n"
    return head + question + "\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + SUFFIX


def rotations(options: dict[str, str], answer: str) -> list[tuple[dict[str, str], str]]:
    """The n rotations (options, answer letter) of a question: rotation k puts option k first."""
    letters, texts = list(options), list(options.values())
    n, right = len(texts), texts[letters.index(answer)]
    out = []
    for k in range(n):
        rot = texts[k:] + texts[:k]
        out.append((dict(zip(letters, rot)), letters[rot.index(right)]))
    return out


def _rows(path: str) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    need = {"index", "question", "A", "B", "answer", "image"} - set(rows[0] if rows else ())
    if need:
        raise ConfigError(f"{path}: an MMBench TSV needs the columns {sorted(need)}")
    return rows


def read(data: str, image_root: str | None = None) -> list[Item]:
    items = []
    for f in data_files(data, (".tsv",)):
        rows = _rows(str(f))
        images = {r["index"]: r["image"] for r in rows if len(r["image"]) > 64}
        circular = any(int(r["index"]) >= GROUP for r in rows)
        for k, r in enumerate(rows):
            options = {c: r[c] for c in string.ascii_uppercase[:8] if c in r and not _empty(r[c])}
            answer = r["answer"].strip()
            if answer not in options:
                raise ConfigError(f"{f} row {k + 2} (index {r['index']}): answer {answer!r} is not one of "
                                  f"its options {list(options)}")
            raw = r["image"] if len(r["image"]) > 64 else images.get(r["image"].strip())
            try:
                image = base64.b64decode(raw or "", validate=True)
            except (binascii.Error, ValueError) as e:
                raise ConfigError(f"{f} row {k + 2} (index {r['index']}): image is not base64 ({e})") from e
            if not image:
                raise ConfigError(f"{f} row {k + 2} (index {r['index']}): no image")
            index = int(r["index"])
            versions = [(options, answer)] if circular else rotations(options, answer)
            for rot, (opts, ans) in enumerate(versions):
                ref = {"group": f"{f.stem}:{index % GROUP}", "rotation": index // GROUP if circular else rot,
                       "options": opts, "answer": ans, "category": r.get("category", ""),
                       "l2_category": r.get("l2-category", "")}
                items.append(Item(f"{f.stem}:{index}:{rot}", prompt(r["question"], r.get("hint"), opts), image, ref))
    return items


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        g = groups.setdefault(r["group"], {"ok": True, "vanilla": None, "category": r["category"],
                                           "l2_category": r["l2_category"]})
        ok = option_letter(r["prediction"], r["options"]) == r["answer"]
        g["ok"] = g["ok"] and ok
        if r["rotation"] == 0:
            g["vanilla"] = ok
    gs = list(groups.values())
    tables = {}
    for key in ("category", "l2_category"):
        names = sorted({g[key] for g in gs if g[key]})
        if names:
            tables[key] = [{key: n, "questions": sum(g[key] == n for g in gs),
                            "circular_accuracy": ratio(sum(g["ok"] for g in gs if g[key] == n),
                                                       sum(g[key] == n for g in gs))} for n in names]
    van = [g["vanilla"] for g in gs if g["vanilla"] is not None]
    return {"metrics": {"circular_accuracy": ratio(sum(g["ok"] for g in gs), len(gs)),
                        "vanilla_accuracy": ratio(sum(van), len(van)), "questions": len(gs),
                        "answers": len(records)},
            "tables": tables or {"category": [{"category": "all", "questions": len(gs),
                                              "circular_accuracy": ratio(sum(g["ok"] for g in gs), len(gs))}]}}


BENCHMARK = Benchmark("mmbench", read, score, chart=("category", "circular_accuracy"), max_new_tokens=8)
