"""Two CPU processes joined by jax.distributed (gloo) run one sharded forward over a global 8-device mesh, and
read an HF checkpoint straight onto an fsdp mesh spanning both (each host reads only part of it)."""

import os
import subprocess
import sys
from pathlib import Path

import portpicker

WORKER = Path(__file__).with_name("multihost_worker.py")


def test_two_process_sharded_forward_matches_local(tmp_path):
    from tests.helpers.hf_models import make_llama

    hf = make_llama(tmp_path, "gqa", hidden_size=64, intermediate_size=128)
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(hf)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        errs = [float(line.split()[1]) for line in out.splitlines() if line.startswith("MAXERR")]
        assert len(errs) == 1 and errs[0] < 1e-5, out
        placed = [line.split()[1:] for line in out.splitlines() if line.startswith("PLACED")]
        assert len(placed) == 1, out
        err, read, total = float(placed[0][0]), int(placed[0][1]), int(placed[0][2])
        assert err == 0.0, out  # every local shard is exactly the whole load's slice
        assert read <= 0.55 * total, out  # fsdp over the two hosts: each reads about its half of every tensor
