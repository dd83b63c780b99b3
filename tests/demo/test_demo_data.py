"""The demo's generated data: deterministic, held-out splits disjoint, every reference answer scores as correct."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from demo_app import shapes, text_task


def test_text_task_splits_are_disjoint_deterministic_and_scored_exactly():
    train, held = text_task.splits(300, 50, seed=3)
    assert not {t.prompt for t in train} & {h.prompt for h in held}
    assert text_task.splits(300, 50, seed=3) == (train, held)
    assert text_task.splits(300, 50, seed=4)[1] != held
    it = held[0]
    words = it.prompt.split(": ", 1)[1].split()
    assert it.answer.split() == words[::-1]
    assert text_task.exact_match([it.answer + ".", "wrong"], [it, it]) == 0.5
    assert text_task.exact_match([" ".join(words)], [it]) == 0.0  # not reversed -> wrong


def test_scenes_are_well_formed_and_answers_follow_from_them():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sc = shapes.make_scene(rng, 40, 96, 3, (0.3, 0.45), 1.6)
        assert 40 <= min(sc.width, sc.height) and max(sc.width, sc.height) <= min(96, 1.6 * min(sc.width, sc.height))
        objs = sc.objects
        assert 1 <= len(objs) <= 3
        assert len({o.colour for o in objs}) == len(objs) and len({o.shape for o in objs}) == len(objs)
        for a in objs:
            assert 0 <= a.box[0] < a.box[2] <= sc.width and 0 <= a.box[1] < a.box[3] <= sc.height
            for b in objs:
                if a is not b:  # no overlap
                    assert (a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1]
                            or b.box[3] <= a.box[1])
        qs = shapes.questions(sc, rng, "x.png")
        assert qs["count"].answer == str(len(objs))
        img = np.asarray(shapes.render(sc))
        for o in objs:  # the object's colour is at its box centre (circle, square and triangle all cover it)
            cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3] * 2) // 3
            assert tuple(img[cy, cx]) == shapes.COLOURS[o.colour], (o, img[cy, cx])
        if "position" in qs:
            q = qs["position"].question
            first = next(o for o in objs if q.startswith(f"Is the {o.name} "))
            second = next(o for o in objs if q.endswith(f"of the {o.name}?"))
            assert qs["position"].answer == ("left" if first.cx < second.cx else "right")


def test_write_is_deterministic_and_reference_answers_score(tmp_path):
    a = shapes.write(tmp_path / "a", 30, 12, seed=1, max_objects=3)
    b = shapes.write(tmp_path / "b", 30, 12, seed=1, max_objects=3)
    for x, y in ((a.train_json, b.train_json), (a.eval_json, b.eval_json)):
        assert json.loads(open(x).read()) == json.loads(open(y).read())
    assert (tmp_path / "a" / "images" / "train_000003.png").read_bytes() == \
        (tmp_path / "b" / "images" / "train_000003.png").read_bytes()
    assert a.eval_items == shapes.read_eval_items(tmp_path / "a" / "eval_items.json")
    assert {it.kind for it in a.eval_items} == {"colour", "shape", "count", "position", "grounding"}
    assert all(shapes.answer_correct(it, it.answer) for it in a.eval_items)
    g = next(it for it in a.eval_items if it.kind == "grounding")
    assert not shapes.answer_correct(g, "[0.0, 0.0, 0.05, 0.05]") and not shapes.answer_correct(g, "no box")
    c = next(it for it in a.eval_items if it.kind == "colour")
    assert shapes.answer_correct(c, c.answer.upper() + ".")
    train_images = {r["image"] for r in json.loads(open(a.train_json).read())}
    assert not train_images & {it.image for it in a.eval_items}  # held-out images are unseen
    # train_kinds leaves captions out of training rows
    c2 = shapes.write(tmp_path / "c", 20, 2, seed=1, train_kinds=("colour", "count"), rounds=(2, 2))
    for row in json.loads(open(c2.train_json).read()):
        qs = [t["value"] for t in row["conversations"][::2]]
        assert all("colour" in q or "How many" in q for q in qs), qs


def test_demo_data_dir_packs_rows_and_trains_a_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from mm.data.sources import ArrayRecordRows
    from demo_app.data_dir import write_demo_data

    d = ml_collections.ConfigDict(dict(text_train=50, text_eval=10, mm_train_images=12, mm_eval_images=3,
                                       min_side=40, max_side=80, max_aspect=1.6, max_objects=2,
                                       object_scale=[0.35, 0.5], rounds=[3, 5], vocab_size=512,
                                       train_kinds=list(shapes.KINDS), grounding_rate=1.0))
    out = write_demo_data(tmp_path, d, seed=0, log=lambda m: None)
    assert len(ArrayRecordRows(out.mm_train)) == 12 and len(ArrayRecordRows(out.mm_eval)) == 3
    tok = AutoTokenizer.from_pretrained(out.tokenizer)
    for w in text_task.WORDS:  # every task word is one token (after a space)
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    assert len(out.text_items) == 10


def test_unknown_stage_is_named():
    from configs.demo import get_config

    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        get_config("nope,/tmp/x")
