"""mm-eval's scorers on tiny files in each benchmark's published format (MME's directory layouts, MMBench's TSV
with base64 images, POPE's JSONL, RefCOCO-style rows), against hand-computed values; and the answer
extraction rules. No model: these run in the README's test command."""

from __future__ import annotations

import base64
import csv
import io
import json
import math

import pytest
from PIL import Image

from mm.config import ConfigError
from mm.eval import extract, mmbench, mme, pope, refcoco


def _png(path=None, size=(16, 12), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _records(items, predictions, **extra):
    assert len(items) == len(predictions)
    return [{"index": i, "id": it.id, "prediction": p, **extra, **it.ref}
            for i, (it, p) in enumerate(zip(items, predictions))]


# --------------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, want", [("Yes", "yes"), ("no", "no"), (" No.", "no"), ("Yes, there is.", "yes"),
                                        ("I think yes", "other"), ("Not sure", "no"), ("", "other")])
def test_mme_yes_no(text, want):
    assert extract.mme_yes_no(text) == want


@pytest.mark.parametrize("text, want", [("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a cat", "no"),
                                        ("Yes. No", "yes"), ("no, none", "no"), ("Nope", "yes")])
def test_pope_yes_no(text, want):
    assert extract.pope_yes_no(text) == want


OPTS = {"A": "red circle", "B": "blue square", "C": "green star"}


@pytest.mark.parametrize("text, want", [("B", "B"), ("(C) green star", "C"), ("C.", "C"), ("The answer is A.", "A"),
                                        ("A blue square", "B"), ("a green star", "C"), ("B or C", None),
                                        ("something else", None), ("red circle or blue square", None)])
def test_option_letter(text, want):
    assert extract.option_letter(text, OPTS) == want


# --------------------------------------------------------------------------------------------------------- MME
def _mme(root):
    """existence (images and questions side by side), artwork (images/ + questions_answers_YN/), code_reasoning."""
    for name in ("a", "b"):
        _png(root / "existence" / f"{name}.png")
        (root / "existence" / f"{name}.txt").write_text(f"Is there a {name}? Please answer yes or no.\tYes\n"
                                                        f"Is there a cow? Please answer yes or no.\tNo\n")
    _png(root / "artwork" / "images" / "c.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "c.txt").write_text("Is it by Monet?\tYes\nIs it by Dali?\tNo\n")
    _png(root / "code_reasoning" / "d.png")
    (root / "code_reasoning" / "d.txt").write_text("Does it print 3?\tYes\nDoes it print 4?\tNo\n")
    return root


def test_mme_scores_by_hand(tmp_path):
    items = mme.read(str(_mme(tmp_path / "MME")))
    assert [it.id for it in items] == ["artwork/c.jpg#0", "artwork/c.jpg#1", "code_reasoning/d.png#0",
                                       "code_reasoning/d.png#1", "existence/a.png#0", "existence/a.png#1",
                                       "existence/b.png#0", "existence/b.png#1"]
    assert items[0].image == "artwork/images/c.jpg" and items[0].ref["answer"] == "yes"
    preds = ["I think yes", "no",            # artwork: "other" (wrong), right -> acc 50, acc+ 0 -> 50
             "Yes", "No.",                  # code_reasoning: both right -> 100 + 100
             "Yes", "No",                   # existence a: both right
             "Yes, there is", "yes"]        # existence b: right, wrong -> acc 75, acc+ 50 -> 125
    s = mme.score(_records(items, preds))
    rows = {r["subtask"]: r for r in s["tables"]["subtasks"]}
    assert (rows["existence"]["acc"], rows["existence"]["acc_plus"], rows["existence"]["score"]) == (75, 50, 125)
    assert (rows["artwork"]["acc"], rows["artwork"]["acc_plus"], rows["artwork"]["score"]) == (50, 0, 50)
    assert rows["code_reasoning"]["score"] == 200 and rows["code_reasoning"]["kind"] == "cognition"
    assert [r["subtask"] for r in s["tables"]["subtasks"]] == ["existence", "artwork", "code_reasoning"]
    assert s["metrics"] == {"perception": 175, "cognition": 200, "total": 375, "questions": 8}


def test_mme_bad_line_names_the_file(tmp_path):
    root = _mme(tmp_path / "MME")
    (root / "existence" / "a.txt").write_text("no tab here\n")
    with pytest.raises(ConfigError, match=r"existence/a.txt line 1: expected 'question<TAB>Yes\|No'"):
        mme.read(str(root))


# ------------------------------------------------------------------------------------------------------- POPE
def _pope(d):
    d.mkdir()
    rows = {"random": [("yes", 1), ("yes", 2), ("no", 3), ("no", 4)], "adversarial": [("yes", 1), ("no", 2),
                                                                                        ("no", 3)]}
    for split, rs in rows.items():
        (d / f"coco_pope_{split}.json").write_text("".join(json.dumps(
            {"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg", "text": f"Is there a thing {q} in the image?",
             "label": lab}) + "\n" for lab, q in rs))
    return d


def test_pope_scores_by_hand(tmp_path):
    items = pope.read(str(_pope(tmp_path / "pope")))
    assert [it.id for it in items][:3] == ["adversarial/1", "adversarial/2", "adversarial/3"]
    assert items[0].image == "COCO_val2014_000000000001.jpg" and items[0].question.startswith("Is there a thing 1")
    preds = ["yes", "no", "No",                                            # adversarial: TP 1, TN 2
             "Yes, there is a dog.", "No.", "There is not a cat", "Yes"]  # random: TP, FN, TN, FP
    s = pope.score(_records(items, preds))
    rows = {r["split"]: r for r in s["tables"]["splits"]}
    assert rows["random"] == {"split": "random", "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                              "yes_ratio": 0.5, "n": 4}
    assert rows["adversarial"] == {"split": "adversarial", "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                                   "f1": 1.0, "yes_ratio": pytest.approx(1 / 3), "n": 3}
    assert s["metrics"]["mean_accuracy"] == 0.75 and s["metrics"]["mean_f1"] == 0.75
    # precision over no "yes" answer is undefined (nan), F1 then 0
    none = pope.metrics(["no", "no"], ["yes", "no"])
    assert math.isnan(none["precision"]) and none["recall"] == 0 and none["f1"] == 0 and none["accuracy"] == 0.5


# ---------------------------------------------------------------------------------------------------- MMBench
def _tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def test_mmbench_circular_by_hand(tmp_path):
    img = base64.b64encode(_png(size=(20, 20))).decode()
    _tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        {"index": 0, "question": "Which animal?", "hint": "nan", "A": "cat", "B": "dog", "C": "bird", "answer": "B",
         "category": "animals", "image": img, "l2-category": "perception"},
        {"index": 1, "question": "Which colour?", "hint": "Look at the sky.", "A": "blue", "B": "red",
         "C": "green", "D": "black", "answer": "A", "category": "colours", "image": "0", "l2-category": "perception"}])
    items = mmbench.read(str(tmp_path / "MMBench_DEV_EN.tsv"))
    assert len(items) == 3 + 4
    # rotation k puts option k first; the answer letter follows its text (dog: B, A, C)
    assert [it.ref["options"] for it in items[:3]] == [{"A": "cat", "B": "dog", "C": "bird"},
                                                       {"A": "dog", "B": "bird", "C": "cat"},
                                                       {"A": "bird", "B": "cat", "C": "dog"}]
    assert [it.ref["answer"] for it in items] == ["B", "A", "C", "A", "D", "C", "B"]
    assert items[0].question == ("Which animal?\nA. cat\nB. dog\nC. bird\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert items[3].question.startswith("Look at the sky.\nWhich colour?\nA. blue\n")
    assert items[3].image == items[0].image and items[0].image[:4] == b"\x89PNG"  # "0": row 0's image
    preds = ["B", "The answer is A.", "dog",     # question 0: every rotation right
             "A", "D", "A", "B"]                 # question 1: rotation 2 answers A (blue is C there)
    s = mmbench.score(_records(items, preds))
    assert s["metrics"] == {"circular_accuracy": 0.5, "vanilla_accuracy": 1.0, "questions": 2, "answers": 7}
    assert s["tables"]["category"] == [{"category": "animals", "questions": 1, "circular_accuracy": 1.0},
                                       {"category": "colours", "questions": 1, "circular_accuracy": 0.0}]
    assert s["tables"]["l2_category"] == [{"l2_category": "perception", "questions": 2, "circular_accuracy": 0.5}]


def test_mmbench_file_with_its_own_rotations(tmp_path):
    """MMBench's circular files carry the rotations (index + k * 1e6): used as they are, grouped."""
    img = base64.b64encode(_png()).decode()
    _tsv(tmp_path / "circ.tsv", [
        {"index": 7, "question": "Q", "A": "x", "B": "y", "answer": "A", "category": "c", "image": img},
        {"index": 1000007, "question": "Q", "A": "y", "B": "x", "answer": "B", "category": "c", "image": "7"}])
    items = mmbench.read(str(tmp_path / "circ.tsv"))
    assert [(it.ref["group"], it.ref["rotation"], it.ref["answer"]) for it in items] == [("circ:7", 0, "A"),
                                                                                       ("circ:7", 1, "B")]
    assert mmbench.score(_records(items, ["A", "A"]))["metrics"]["circular_accuracy"] == 0.0
    assert mmbench.score(_records(items, ["x", "x"]))["metrics"]["circular_accuracy"] == 1.0


def test_mmbench_bad_answer_names_the_row(tmp_path):
    _tsv(tmp_path / "bad.tsv", [{"index": 0, "question": "Q", "A": "x", "B": "y", "answer": "C", "image": "x" * 80}])
    with pytest.raises(ConfigError, match=r"bad.tsv row 2 \(index 0\): answer 'C' is not one of its options"):
        mmbench.read(str(tmp_path / "bad.tsv"))


# ---------------------------------------------------------------------------------------------------- RefCOCO
def test_refcoco_boxes_mapped_from_the_padded_square(tmp_path):
    """A 40x20 image pads to a 40x40 square with 10 rows above: the COCO box [10, 5, 20, 10] (x1 y1 x2 y2 =
    10 5 30 15) is [0.25, 0.375, 0.75, 0.625] on the square."""
    f = tmp_path / "refcoco_val.jsonl"
    f.write_text("".join(json.dumps({"image": "img.png", "sent": s, "bbox": [10, 5, 20, 10], "id": k}) + "\n"
                         for k, s in enumerate(["left man", "the dog", "a car"])))
    items = refcoco.read(str(f))
    assert items[0].question == ("Please provide the bounding box coordinate of the region this sentence "
                                 "describes: left man")
    assert items[0].ref == {"split": "refcoco_val", "box": [10.0, 5.0, 30.0, 15.0]}
    preds = ["[0.25, 0.375, 0.75, 0.625]",   # the box exactly: IoU 1
             "[0.25, 0.25, 0.75, 0.5]",      # maps to (10, 0, 30, 10): IoU 100 / 300 -> miss
             "no box here"]                  # a miss
    assert refcoco.hit(preds[1], [10, 5, 30, 15], 40, 20) == (False, [10.0, 0.0, 30.0, 10.0])
    s = refcoco.score(_records(items, preds, image_size=[40, 20]))
    assert s["tables"]["splits"] == [{"split": "refcoco_val", "n": 3, "acc@0.5": pytest.approx(1 / 3)}]
    assert s["metrics"]["acc@0.5"] == pytest.approx(1 / 3)
    # the same answer read without the padding (y scaled by the height) would overlap [10, 7.5, 30, 12.5]: the
    # mapping matters; a 20x40 portrait image pads columns instead
    assert refcoco.hit("[0.375, 0.25, 0.625, 0.75]", [5, 10, 15, 30], 20, 40)[0]


def test_refcoco_bad_row_names_the_file(tmp_path):
    f = tmp_path / "refcoco_testA.json"
    f.write_text(json.dumps([{"image": "x.png", "sent": "x", "bbox": [1, 2, 3]}]))
    with pytest.raises(ConfigError, match="refcoco_testA.json row 0: needs image"):
        refcoco.read(str(f))
