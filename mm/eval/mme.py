"""MME (yes / no questions, two per image: one true "Yes", one true "No") in its release layout:

    ROOT/<subtask>/images/<name>.<jpg|png> + ROOT/<subtask>/questions_answers_YN/<name>.txt    (or)
    ROOT/<subtask>/<name>.<jpg|png>        + ROOT/<subtask>/<name>.txt

each text file holding one `question<TAB>Yes|No` a line. Images are read from ROOT (`--data`).

Scores by the official rule: answers parsed by `extract.mme_yes_no` ("other" is wrong); per subtask accuracy
= correct questions / questions and accuracy+ = images with every question right / images, both in percent;
the subtask's score is their sum (at most 200). Perception = the sum over the 10 perception subtasks present,
cognition = the sum over the 4 cognition subtasks present (at most 2000 and 800 with every subtask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mm.config import ConfigError
from mm.eval.benchmarks import Benchmark, Item, ratio
from mm.eval.extract import mme_yes_no

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGES = (".jpg", ".jpeg", ".png")


def _pairs(task_dir: Path) -> list[tuple[Path, Path]]:
    """(question file, image file) of a subtask directory in either release layout."""
    qa, img = task_dir / "questions_answers_YN", task_dir / "images"
    qdir, idir = (qa, img) if qa.is_dir() else (task_dir, task_dir)
    out = []
    for q in sorted(qdir.glob("*.txt")):
        found = [idir / (q.stem + s) for s in _IMAGES if (idir / (q.stem + s)).is_file()]
        if not found:
            raise ConfigError(f"{q}: no image {q.stem}.jpg / .png beside it in {idir}")
        out.append((q, found[0]))
    return out


def read(data: str, image_root: str | None = None) -> list[Item]:
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data {data}: MME is a directory of subtask directories")
    items = []
    for task_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for qfile, image in _pairs(task_dir):
            for k, line in enumerate(qfile.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise ConfigError(f"{qfile} line {k + 1}: expected 'question<TAB>Yes|No'")
                rel = str(image.relative_to(root))
                items.append(Item(f"{task_dir.name}/{image.name}#{k}", parts[0].strip(), rel,
                                  {"task": task_dir.name, "image": rel, "answer": parts[1].strip().lower()}))
    if not items:
        raise ConfigError(f"--data {data}: no MME question file found")
    return items


def score(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    tasks: dict[str, dict[str, Any]] = {}
    for r in records:
        t = tasks.setdefault(r["task"], {"questions": 0, "correct": 0, "images": {}})
        ok = mme_yes_no(r["prediction"]) == r["answer"]
        t["questions"] += 1
        t["correct"] += ok
        t["images"][r["image"]] = t["images"].get(r["image"], True) and ok
    rows = []
    for name in sorted(tasks, key=lambda n: (PERCEPTION + COGNITION + (n,)).index(n)):
        t = tasks[name]
        acc = 100 * ratio(t["correct"], t["questions"])
        acc_plus = 100 * ratio(sum(t["images"].values()), len(t["images"]))
        kind = "perception" if name in PERCEPTION else "cognition" if name in COGNITION else "other"
        rows.append({"subtask": name, "kind": kind, "questions": t["questions"], "images": len(t["images"]),
                     "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus})
    total = {k: sum(r["score"] for r in rows if r["kind"] == k) for k in ("perception", "cognition")}
    return {"metrics": {"perception": total["perception"], "cognition": total["cognition"],
                        "total": total["perception"] + total["cognition"], "questions": len(records)},
            "tables": {"subtasks": rows}}


BENCHMARK = Benchmark("mme", read, score, chart=("subtasks", "score"), max_new_tokens=8)
