"""Profiling one process: `profile.steps` captures a trace whose summary splits step time correctly, device
memory profiles that the pprof reader opens, the HLO dump, and the compiled step next to an mm-aot report."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from debian import pprof_raw
from helpers_train import tiny
from launch.profile import main as profile_main
from mm.profiling import summary
from mm.train import loop

ROOT = Path(__file__).resolve().parents[2]


def _op(name, ts, dur, tid=7):
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": name}}


def test_step_rows_interval_arithmetic():
    meta = [{"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "train.py"}}]
    host = [{"ph": "X", "pid": 1, "tid": 8, "name": "train 3", "ts": 0, "dur": 100, "args": {"step_num": "3"}},
            {"ph": "X", "pid": 1, "tid": 8, "name": "mm/data", "ts": 0, "dur": 6},
            {"ph": "X", "pid": 1, "tid": 8, "name": "mm/dispatch", "ts": 6, "dur": 3},
            {"ph": "X", "pid": 1, "tid": 8, "name": "train 4", "ts": 200, "dur": 50, "args": {"step_num": "4"}}]
    ops = [_op("dot.1", 10, 30), _op("fusion.2", 20, 30),  # compute 10..50
           _op("all-reduce.3", 45, 25),  # 45..70: 5 us under compute, 60..70 under the all-gather: 10 us counted
           _op("all-gather-start.4", 60, 20),  # 60..80, counted first (kinds in COLLECTIVE_KINDS order): 20 us
           _op("dot.1", 210, 10),
           {"ph": "X", "pid": 1, "tid": 7, "name": "end: all-reduce.3", "ts": 70, "dur": 1},  # marker, not an op
           {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "ts": 0, "dur": 100}]  # runtime
    rows, per_op = summary.step_rows(meta + host + ops)
    assert sorted(rows) == [3, 4]
    r = rows[3]
    assert r["compute_us"] == 40 and r["collectives_us"] == {"all-gather": 20, "all-reduce": 10}
    assert r["collectives_total_us"] == 30 and r["idle_us"] == 30
    assert (r["data_us"], r["dispatch_us"]) == (6, 3)
    assert rows[4]["compute_us"] == 10 and rows[4]["idle_us"] == 40
    assert per_op["dot.1"] == 40 and "ThunkExecutor::Execute" not in per_op


def test_collective_kinds_of_op_names():
    assert [summary.kind_of(n) for n in ("all-gather.3", "all-reduce-start.1", "reduce-scatter.2", "send.1",
                                         "recv-done.4", "collective-permute-done", "fusion.7", "dot")] == \
        ["all-gather", "all-reduce", "reduce-scatter", "send/recv", "send/recv", "collective-permute", None, None]


def test_profile_steps_memory_profiles_hlo_and_expected_vs_measured(tmp_path, capsys):
    c = tiny()
    c.profile.steps = (2, 4)
    c.profile.dump_hlo = True
    w = tmp_path / "w"
    loop.train(c, w, devices=jax.devices()[:1])
    compiled = json.loads((w / "compiled_step.json").read_text())
    assert compiled["devices"] == 1 and compiled["memory"]["total"] > 0 and compiled["xla_flops_per_device"] > 0
    assert (w / "hlo" / "train_step.lowered.txt").read_text().startswith("module @jit_traced")
    assert "HloModule" in (w / "hlo" / "train_step.optimized.txt").read_text()

    # device memory profiles after each traced step, read by pprof itself
    mem = sorted((w / "profile" / "process_0").glob("memory_step_*.prof"))
    assert [p.name for p in mem] == ["memory_step_3.prof", "memory_step_4.prof"]
    raw = pprof_raw(mem[0])
    assert "allocations/count space/bytes" in raw
    buffers = [int(line.split()[1].rstrip(":")) for line, nxt in zip(raw.splitlines(), raw.splitlines()[1:])
               if "kind:[buffer]" in nxt]
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(loop.build(c, log=False,
                       devices=jax.devices()[:1], abstract=True).state["params"]))
    assert sum(buffers) >= params_bytes  # live buffers hold at least the params

    # an mm-aot report of the same step, on the same (CPU) device
    r = subprocess.run([sys.executable, "-m", "launch.aot", "--config=tests/train/helpers_train.py:full",
                        "--topology=cpu:1", f"--json={w / 'aot.json'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert profile_main(["summarize", str(w / "profile")]) == 0
    out = capsys.readouterr().out
    s = json.loads((w / "profile" / "summary.json").read_text())
    assert s["steps"] == [3, 4] and list(s["processes"]) == ["0"]
    m = s["overall"]
    assert m["compute_us"] > 0
    assert m["compute_us"] + m["collectives_total_us"] + m["idle_us"] == pytest.approx(m["wall_us"])
    assert m["data_us"] > 0 and m["dispatch_us"] > 0
    e = s["expected_vs_measured"]
    assert e["expected"]["xla_flops_per_device"] == pytest.approx(compiled["xla_flops_per_device"])
    assert e["notes"] == [], e["notes"]  # same config, same device
    assert "expected vs measured" in out and "compiler (cpu:1, 1 x cpu)" in out
    assert (w / "profile" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a report of another step is named as such
    aot = json.loads((w / "aot.json").read_text())
    aot["config"]["train"]["batch_size"] *= 2
    (w / "other.json").write_text(json.dumps(aot))
    assert profile_main(["summarize", str(w / "profile"), f"--aot={w / 'other.json'}"]) == 0
    assert "not the same step: train.batch_size" in capsys.readouterr().out

    assert profile_main(["collectives", str(w)]) == 0
    assert "0 collective op(s)" in capsys.readouterr().out  # one device: nothing to exchange


def test_missing_traces_and_dumps_are_named(tmp_path, capsys):
    assert profile_main(["summarize", str(tmp_path)]) == 2
    assert f"{tmp_path}: no *.xplane.pb" in capsys.readouterr().err
    assert profile_main(["collectives", str(tmp_path)]) == 2
    assert "profile.dump_hlo=True" in capsys.readouterr().err
