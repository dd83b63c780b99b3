"""The soup run, shortened (`mm-train --config=configs/soups.py --config.quick=True`): data -> base -> shared IAA
start -> one branch per mixture -> average / maximum / greedy soups chosen on the validation split -> test
accuracy -> report. Checked: the layout and report; greedy's recorded decisions follow its rule (POINTS' >=) on
its own recorded scores; the average soup's branch is the float32 mean of the ingredients' branches while its
frozen base is the base LLM's, so the soup's text workflow gives the base LLM's logits exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.demo.pipeline_runs import mm_train, quick_run as run_quick

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command
MIXTURES = ("colour_heavy", "count_heavy", "grounding_heavy")


def _mm_train(workdir: Path, *flags: str):
    return mm_train("configs/soups.py", workdir, *flags)


@pytest.fixture(scope="module")
def quick_soups(tmp_path_factory):
    return run_quick("configs/soups.py", tmp_path_factory.mktemp("soups") / "run")


def test_quick_soup_run_reports_every_model(quick_soups):
    w, out = quick_soups
    results = json.loads((w / "results.json").read_text())
    names = ["start", *[f"ingredient {m}" for m in MIXTURES], "average soup", "maximum soup", "greedy soup"]
    assert list(results["models"]) == names
    for r in results["models"].values():
        assert 0 <= r["validation"] <= 1 and 0 <= r["test"]["all"] <= 1 and "grounding_acc@0.5" in r["test"]
    report = (w / "soups.md").read_text()
    assert "| model | validation | test (all) |" in report and "greedy order" in report
    assert (w / "plots" / "soups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("average", "maximum", "greedy"):
        assert (w / "soups" / method / "mm_config.json").exists()
        assert (w / "soups" / method / "soup_report.png").exists()
    for part in ("data", "base", "start", "ingredient count_heavy", "soups", "evaluate", "report"):
        assert f"] {part} (elapsed" in out
    assert results["counts"]["validation_questions"] > 0 and results["counts"]["test_questions"] > 0


def test_greedy_decisions_follow_its_rule_and_maximum_takes_the_top_two(quick_soups):
    w, _ = quick_soups
    g = json.loads((w / "soups" / "greedy" / "soup_report.json").read_text())
    scores = {x["path"]: x["score"] for x in g["ingredients"]}
    assert g["order"] == sorted(scores, key=lambda p: -scores[p])  # stable sort: ties keep the input order
    best, members = scores[g["order"][0]], [g["order"][0]]
    for s, nxt in zip(g["soups"], g["order"][1:]):
        assert s["members"] == members + [nxt]
        assert s["accepted"] == (s["score"] >= best)  # POINTS: keep when the score does not drop
        if s["accepted"]:
            members, best = members + [nxt], s["score"]
    assert g["final"]["members"] == members
    m = json.loads((w / "soups" / "maximum" / "soup_report.json").read_text())
    top2 = sorted(scores, key=lambda p: -scores[p])[:2]
    assert sorted(m["final"]["members"]) == sorted(top2)


def test_average_soup_is_the_branch_mean_on_the_frozen_base(quick_soups):
    import mm
    from flax.traverse_util import flatten_dict as flatten

    from mm.checkpoints.mm_dir import load_param_paths, params_metadata

    w, _ = quick_soups

    def tensors(d):
        meta = params_metadata(d)
        tree = load_param_paths(d, list(meta), {p: m[1] for p, m in meta.items()}, {p: m[0] for p, m in meta.items()})
        return {p: np.asarray(a) for p, a in flatten(tree).items()}

    ins = [tensors(w / "ingredients" / m / "export") for m in MIXTURES]
    out = tensors(w / "soups" / "average")
    moved = 0
    for key, a in out.items():
        if key[0] == "mm" and not all(np.array_equal(ins[0][key], x[key]) for x in ins):
            moved += 1
            ref = (sum(x[key].astype(np.float64) for x in ins) / 3).astype(np.float32).astype(a.dtype)
            np.testing.assert_allclose(a.astype(np.float64), ref.astype(np.float64), rtol=1e-6, atol=1e-7,
                                       err_msg="/".join(key))
        else:
            assert np.array_equal(a, ins[0][key]), key
    assert moved > 10
    base = mm.from_pretrained(w / "base" / "export")
    souped = mm.from_pretrained(w / "soups" / "average")
    ids = base.tokenizer("Reverse the words: sun moon tree")["input_ids"]
    assert np.array_equal(souped.logits([ids], workflow="text"), base.logits([ids]))


def test_bad_mixture_key_exits_2_before_any_work(tmp_path):
    proc = _mm_train(tmp_path / "w", "--config.mixtures.count_heavy.kinds=('count', 'nope')")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mixtures.count_heavy.kinds" in proc.stderr and not (tmp_path / "w").exists()
