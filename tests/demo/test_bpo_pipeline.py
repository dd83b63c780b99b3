"""The BPO run, shortened (`mm-train --config=configs/bpo.py --config.quick=True`): data -> base -> IAA ->
BPO negatives on new scenes -> DPO of the IAA branch (reference log-probs precomputed) -> held-out preference
before / after -> report. Checked: the negatives' counts add up to the pairs written; on held-out pairs the
DPO export prefers the dataset answers more than the start did (rewards against the start above 0, the
model's own log-prob margin up); the text workflow is the start's bit for bit; a bad key exits 2 first."""

from __future__ import annotations

import json

import pytest

from tests.demo.pipeline_runs import mm_train, quick_run

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command


@pytest.fixture(scope="module")
def quick_bpo(tmp_path_factory):
    return quick_run("configs/bpo.py", tmp_path_factory.mktemp("bpo") / "run")


def test_quick_bpo_run_reports_before_and_after(quick_bpo):
    w, out = quick_bpo
    r = json.loads((w / "results.json").read_text())
    for split, name in (("train", "pairs.jsonl"), ("heldout", "heldout_pairs.jsonl")):
        s = r["negatives"][split]
        pairs = [json.loads(x) for x in (w / "bpo" / name).read_text().splitlines()]
        assert s["complete"] and s["kept"] == len(pairs) == sum(s["kept_by_method"].values()) > 0, s
        assert {p["bpo"]["method"] for p in pairs} <= {"noise", "inject"}
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    pref = r["preference"]["all"]
    before, after = pref["before"], pref["after"]
    assert before["rewards/margins"] == 0.0 and before["pairs"] == after["pairs"] == r["negatives"]["heldout"]["kept"]
    assert after["rewards/margins"] > 0 and after["rewards/accuracies"] > 0.5, after
    assert after["preference/margin"] > before["preference/margin"], (before, after)
    t = r["text_workflow"]
    assert t["base_params_identical"] and t["text_logits_max_abs_diff"] == 0.0, t
    assert (w / "dpo" / "reference_logps" / "train.json").exists()  # the recipe precomputes the reference
    curve = r["dpo_curve"]
    # step 1 scores the start against itself (rewards 0; the recipe's loss is sigmoid + sft, so ln 2 + the chosen
    # answers' NLL), and training lowers it
    assert abs(curve[0]["rewards/margins"]) < 1e-5 and curve[0]["loss"] > 0.6931, curve
    assert curve[-1]["loss"] < curve[0]["loss"], curve
    report = (w / "bpo.md").read_text()
    assert "| held-out pairs | n | log-prob accuracy before -> after |" in report and "bitwise identical" in report
    assert (w / "plots" / "bpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ETA" in out and "mm-bpo: " in out


def test_bad_negatives_key_exits_2_before_any_work(tmp_path):
    p = mm_train("configs/bpo.py", tmp_path / "w", "--config.negatives.methods=('noise','bogus')")
    assert p.returncode == 2 and "negatives.methods" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "w" / "data").exists()
