"""`mm-eval compare`'s verdict from two lm-eval results: a metric or an item that differs by one ulp is a
difference; nan equals nan. No harness needed (lm-eval's result dicts are written by hand)."""

import math

import pytest

from mm.config import ConfigError
from mm.eval import compare


def _res(acc, ppl, resps):
    return {"results": {"t": {"alias": "t", "acc,none": acc, "acc_stderr,none": 0.1, "ppl,none": ppl}},
            "samples": {"t": [{"doc_id": k, "resps": r} for k, r in enumerate(resps)]}}


def test_identical_and_different():
    a = _res(0.5, float("nan"), [[[-1.0, False]], [[-2.0, True]]])
    assert [r["identical"] for r in compare.text_rows(a, a)] == [True, True]
    assert compare.item_agreement(a, a) == {"t": [2, 2]}
    b = _res(math.nextafter(0.5, 1), float("nan"), [[[-1.0, False]], [[math.nextafter(-2.0, 0), True]]])
    rows = compare.text_rows(a, b)
    assert [(r["metric"], r["identical"]) for r in rows] == [("acc", False), ("ppl", True)]
    assert compare.item_agreement(a, b) == {"t": [2, 1]}


def test_vlm_task_spec(tmp_path):
    (tmp_path / "p.json").write_text("")
    assert compare.parse_vlm_tasks(f"pope={tmp_path / 'p.json'}@{tmp_path},mme={tmp_path}") == [
        ("pope", str(tmp_path / "p.json"), str(tmp_path)), ("mme", str(tmp_path), None)]
    with pytest.raises(ConfigError, match="expected BENCH=DATA"):
        compare.parse_vlm_tasks("nosuch=x")
    with pytest.raises(ConfigError, match="nothere: no such file"):
        compare.parse_vlm_tasks(f"pope={tmp_path / 'nothere'}")
