"""Profiling a 2-process x 2-device FSDP run (jax.distributed + gloo): both traces merged into one summary, a
planted straggler found with its delay, the collectives XLA inserted for the sharded parameters, memory
profiles per process, and a live profiler server that xprof's client captures from while the job runs."""

import collections
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax

from debian import pprof_raw
from launch.local_cluster import free_port, launch
from launch.profile import main as profile_main
from mm.train import loop
from mm.train import param_groups as pg
from tests.train.helpers_train import config_with

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("straggler_worker.py")  # run as a module: tests/ goes on PYTHONPATH
DELAY_S = 0.25
OVERRIDES = {"train.steps": 24, "train.log_every": 1, "checkpoint.every": 0, "init.prng_impl": "unsafe_rbg",
             "metrics.tensorboard": False, "mesh.data": 1, "mesh.fsdp": 4, "profile.steps": (2, 6),
             "profile.dump_hlo": True}


def _config():
    return config_with("configs/tiny_llm.py:full", OVERRIDES)


def test_two_process_fsdp_profile(tmp_path, capsys):
    port = free_port()
    args = ["--config=configs/tiny_llm.py:full", f"--workdir={tmp_path / 'w'}",
            *[f"--config.{k}={v}".replace(" ", "") for k, v in OVERRIDES.items()],
            f"--config.profile.server_port={port}"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", MM_TEST_SLOW_PROCESS="1",
               MM_TEST_DELAY_S=str(DELAY_S))
    procs = launch(2, args, env=env, devices_per_process=2, module=WORKER.stem)

    # capture from process 1's live server (port + its local rank) after the traced steps, while it trains
    lines, captured = [], {}

    def read0():
        for line in procs[0].stdout:
            lines.append(line)
            if "step      8/" in line and "cmd" not in captured:
                cmd = [sys.executable, "-m", "jax.collect_profile", str(port + 1), "1000",
                       f"--log_dir={tmp_path / 'live'}", "--no_perfetto_link"]
                captured["cmd"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                   text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))

    t = threading.Thread(target=read0)
    t.start()
    out1 = procs[1].communicate(timeout=600)[0]
    procs[0].wait(timeout=600)
    t.join()
    out0 = "".join(lines)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (out0[-3000:], out1[-3000:])
    assert f"process 1: profiler server on port {port + 1}" in out1
    assert f"process 0: profiler server on port {port}" in out0
    live = captured["cmd"].communicate(timeout=300)[0]
    assert captured["cmd"].returncode == 0, live[-3000:]
    assert list((tmp_path / "live").rglob("*.xplane.pb")), live[-3000:]

    w = tmp_path / "w"
    assert profile_main(["summarize", str(w / "profile")]) == 0
    text = capsys.readouterr().out
    s = json.loads((w / "profile" / "summary.json").read_text())
    assert sorted(s["processes"]) == ["0", "1"] and s["steps"] == [3, 4, 5, 6]
    for p in ("0", "1"):
        assert sorted(map(int, s["processes"][p]["steps"])) == [3, 4, 5, 6]
    # the planted straggler: process 1 waits DELAY_S for data, process 0 waits for it in collectives (the first
    # traced step is left out: the two processes start their traces at different moments inside it)
    steady = s["per_step"][1:]
    assert [r["slowest"] for r in steady] == [1, 1, 1], s["per_step"]
    lag = sum(r["lag_us"] for r in steady) / len(steady) / 1e6
    assert 0.6 * DELAY_S < lag < 1.5 * DELAY_S, lag
    rows = {p: [s["processes"][p]["steps"][str(r["step"])] for r in steady] for p in ("0", "1")}
    assert all(0.9 * DELAY_S < r["data_us"] / 1e6 < 1.5 * DELAY_S for r in rows["1"]), rows["1"]
    assert all(r["collectives_total_us"] / 1e6 > 0.6 * DELAY_S for r in rows["0"]), rows["0"]
    assert "straggler: process 1, slowest in" in text
    print(text)  # the closing note quotes it
    print(f"planted {DELAY_S * 1e3:.1f} ms, detected {lag * 1e3:.1f} ms")

    # memory profiles: every process, every traced step, readable by pprof
    for p in (0, 1):
        files = sorted((w / "profile" / f"process_{p}").glob("memory_step_*.prof"))
        assert [f.name for f in files] == [f"memory_step_{n}.prof" for n in (3, 4, 5, 6)]
        raw = pprof_raw(files[-1])
        assert "allocations/count space/bytes" in raw and "kind:[buffer]" in raw

    # the HLO dump's collectives against the parameters FSDP shards (from the run's own shardings)
    assert profile_main(["collectives", str(w), f"--json={tmp_path / 'c.json'}"]) == 0
    ops = json.loads((tmp_path / "c.json").read_text())["ops"]
    assert {o["kind"] for o in ops} <= {"all-gather", "reduce-scatter", "all-reduce", "all-to-all"}
    b = loop.build(_config(), log=False, devices=jax.devices()[:4], abstract=True)
    sharded = {k: tuple(v.shape) for k, v in pg.flatten(b.state["params"]).items()
               if any(a is not None for a in v.sharding.spec)}
    assert len(sharded) == 16
    # XLA gathers every sharded weight once per step but the embedding table, whose rows it looks up where
    # they lie (it all-gathers the int32 token ids instead)
    gathered = collections.Counter(tuple(o["shapes"][0][1]) for o in ops
                                   if o["kind"] == "all-gather" and o["shapes"][0][0] == "f32")
    expect = collections.Counter(v for k, v in sharded.items() if not k.startswith("embed_tokens"))
    assert gathered == expect, (gathered, expect)
    assert [o["shapes"][0][0] for o in ops if o["kind"] == "all-gather" and o["shapes"][0][0] != "f32"] == ["s32"]
    # every weight's gradient is reduced over the 4 fsdp devices once (CPU: a full all-reduce, in the layout
    # the backward pass produced) - but the embedding table's: the
    # lookup's gradient is scattered into the rows each device holds
    params = {k: tuple(v.shape) for k, v in pg.flatten(b.state["params"]).items()}
    reduced = collections.Counter(math.prod(s) for o in ops if o["kind"] in ("all-reduce", "reduce-scatter")
                                  for _, s in o["shapes"] if s)
    assert reduced == collections.Counter(math.prod(v) for k, v in params.items() if not k.startswith("embed_tokens"))
    assert {o["group_size"] for o in ops if o["kind"] == "all-gather"} == {4}
