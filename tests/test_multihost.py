"""Two CPU processes joined by jax.distributed (gloo) run one sharded forward over a global 8-device mesh."""

import os
import subprocess
import sys
from pathlib import Path

import portpicker

WORKER = Path(__file__).with_name("multihost_worker.py")


def test_two_process_sharded_forward_matches_local():
    port = portpicker.pick_unused_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        errs = [float(line.split()[1]) for line in out.splitlines() if line.startswith("MAXERR")]
        assert len(errs) == 1 and errs[0] < 1e-5, out
