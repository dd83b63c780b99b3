"""Two local CPU processes (jax.distributed + gloo, one device each) train the tiny config with the same
global batch and get the losses of one process (float tolerance: the all-reduce changes summation order)."""

import json
import os
from pathlib import Path

import jax
import pytest

from launch.local_cluster import launch
from mm.train import loop
from tests.train.helpers_train import config_with

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {"train.steps": 4, "train.log_every": 1, "checkpoint.every": 2, "init.prng_impl": "unsafe_rbg",
             "metrics.tensorboard": False}


def test_two_processes_match_one(tmp_path):
    args = ["--config=configs/tiny_llm.py:full", f"--workdir={tmp_path / 'mp'}",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    procs = launch(2, args, env=env)

    cfg = config_with("configs/tiny_llm.py:full", OVERRIDES)
    single = loop.train(cfg, tmp_path / "one", devices=jax.devices()[:1]).losses

    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "mesh {'data': 2" in outs[0]
    rows = [json.loads(x) for x in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    multi = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert sorted(multi) == [1, 2, 3, 4]
    for s in multi:
        assert multi[s] == pytest.approx(single[s], rel=2e-6, abs=0), (s, multi[s], single[s])
    assert not (tmp_path / "mp" / "metrics.jsonl.1").exists()  # only process 0 writes metrics


def test_a_mesh_whose_batch_does_not_split_over_the_processes_is_a_config_error(tmp_path):
    """2 processes x 1 device with the batch unsplit (tensor parallel only): each process would read rows the
    mesh does not give it; exit 2 naming the mesh, before any step."""
    args = ["--config=configs/tiny_llm.py:full", f"--workdir={tmp_path / 'mp'}", "--config.mesh.data=1",
            "--config.mesh.tensor=2", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    procs = launch(2, args, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode == 2, outs[0][-3000:]
    want = "config key mesh = {'data': 1, 'fsdp': 1, 'tensor': 2}: the batch is split 1 ways"
    assert want in outs[0], outs[0][-3000:]
