"""Profiling: `profile.steps` captures a trace of those steps; the summary splits step time correctly."""

import gzip
import json

import jax
import pytest

from helpers_train import tiny
from launch.profile import main as profile_main
from mm.train import loop
from mm.train.profile_summary import find_traces, summarize_trace


def _write_trace(path, events):
    meta = [{"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "train.py"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_summary_interval_arithmetic(tmp_path):
    ev = [
        {"ph": "X", "pid": 1, "tid": 8, "name": "train", "ts": 0, "dur": 100},
        {"ph": "X", "pid": 1, "tid": 7, "name": "dot.1", "ts": 10, "dur": 30},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion.2", "ts": 20, "dur": 30},  # overlaps dot.1
        {"ph": "X", "pid": 1, "tid": 7, "name": "all-reduce.3", "ts": 45, "dur": 25},  # 5 us under compute
        {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "ts": 0, "dur": 100},  # runtime, ignored
        {"ph": "X", "pid": 1, "tid": 8, "name": "train", "ts": 200, "dur": 50},
        {"ph": "X", "pid": 1, "tid": 7, "name": "dot.1", "ts": 210, "dur": 10},
    ]
    p = tmp_path / "x.trace.json.gz"
    _write_trace(p, ev)
    s = summarize_trace(p)
    assert s["steps"] == 2
    assert s["mean"]["compute_us"] == pytest.approx((40 + 10) / 2)
    assert s["mean"]["collectives_us"] == pytest.approx((20 + 0) / 2)
    assert s["mean"]["idle_us"] == pytest.approx((40 + 40) / 2)
    assert s["top_ops"][0][0] == "dot.1" and s["top_ops"][0][1] == 40


def test_profile_steps_capture_a_trace_that_summarizes(tmp_path, capsys):
    c = tiny()
    c.profile.steps = (2, 4)
    loop.train(c, tmp_path / "w", devices=jax.devices()[:1])
    traces = find_traces(tmp_path / "w" / "profile")
    assert len(traces) == 1 and "process_0" in str(traces[0])
    s = summarize_trace(traces[0])
    assert s["steps"] == 2
    m = s["mean"]
    assert m["compute_us"] > 0 and m["compute_us"] + m["collectives_us"] + m["idle_us"] == pytest.approx(m["wall_us"])
    assert any(name.startswith(("dot", "fusion", "ynn")) or "fusion" in name for name, _, _ in s["top_ops"])
    assert profile_main(["summarize", str(tmp_path / "w" / "profile")]) == 0
    assert "compute" in capsys.readouterr().out
