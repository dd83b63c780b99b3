"""The README's main command, end to end (it must stay true at every commit)."""

import json

from launch import quickstart


def test_quickstart_runs_and_all_checks_pass(tmp_path):
    summary = quickstart.run(tmp_path / "qs")
    assert summary["ok"], summary
    assert summary["max_abs_logit_diff_vs_transformers_256_tokens"] <= 1e-4
    assert json.loads((tmp_path / "qs" / "summary.json").read_text())["round_trip_bit_identical"] is True
    assert "| HF -> mm -> HF round trip bit-identical | True |" in (tmp_path / "qs" / "summary.md").read_text()
