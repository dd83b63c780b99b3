"""`mm-launch slurm` on a real one-node SLURM (Debian's slurm-wlm, started here): the rendered sbatch script runs
2 tasks of `srun mm-train`, jax.distributed finds its peers from the SLURM task environment (no coordinator flags),
and the 2-process run's losses are the 1-process run's (float tolerance: the all-reduce changes the summation
order)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mm.train import loop
from tests.helpers.slurm import one_node_cluster, wait_for_job
from tests.train.helpers_train import config_with

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.steps": 4, "train.log_every": 1, "checkpoint.every": 2, "init.prng_impl": "unsafe_rbg",
             "metrics.tensorboard": False}


def test_sbatch_script_trains_on_two_tasks_like_one_process(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with one_node_cluster(tmp_path) as env:
        env = dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        env.pop("XLA_FLAGS", None)  # one CPU device a task: a 2-device data-parallel mesh
        r = subprocess.run([sys.executable, "-m", "launch.submit", "slurm", "--name=mmtest", f"--workdir={workdir}",
                            "--accelerator=cpu", "--nodes=1", "--tasks_per_node=2", "--",
                            "--config=configs/tiny_llm.py:full", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split()[-1]
        assert r.stdout.startswith("mm-launch: submitted SLURM job") and job.isdigit(), r.stdout
        wait_for_job(job, env)
    log = (workdir / f"slurm-{job}.out").read_text()
    assert log.count("mm-train: finished at step 4") == 2, log[-4000:]  # both tasks
    assert "mesh {'data': 2" in log, log[-4000:]

    cfg = config_with("configs/tiny_llm.py:full", OVERRIDES)
    single = loop.train(cfg, tmp_path / "one", devices=jax.devices()[:1]).losses
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    multi = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert sorted(multi) == [1, 2, 3, 4]
    print("SLURM 2 tasks vs 1 process, max relative loss difference:",
          max(abs(multi[s] - single[s]) / abs(single[s]) for s in multi))
    for s in multi:
        assert multi[s] == pytest.approx(single[s], rel=2e-6, abs=0), (s, multi[s], single[s])
