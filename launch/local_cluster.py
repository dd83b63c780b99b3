"""Start N local `mm-train` processes joined by `jax.distributed` (CPU: gloo collectives).

    python -m launch.local_cluster --num_processes=2 [--devices_per_process=1] -- \
        --config=configs/tiny_llm.py:full --workdir=/tmp/run

Everything after `--` goes to every process; the launcher adds the coordinator address, process count and
id overrides. Each process's output is prefixed with its id; the exit status is the first non-zero one.
For real clusters, run `mm-train` once per host with the same three overrides (or let jax discover them on
TPU pods / SLURM).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from typing import Sequence


def free_port() -> int:
    """A TCP port free on this host now (for a local coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(prefix: str, stream, out) -> None:
    for line in stream:
        out.write(f"[{prefix}] {line}")
        out.flush()


def launch(num_processes: int, train_args: Sequence[str], *, devices_per_process: int = 1,
           port: int | None = None, env: dict[str, str] | None = None,
           module: str = "launch.train", logs: Sequence[str] | None = None) -> list[subprocess.Popen]:
    """Starts the processes (not waiting); stdout/stderr are pipes the caller reads, or go to the files `logs`
    (one a process). Each runs `python -m module` (mm-train's entry point unless told) with LOCAL_RANK set to
    its index on this host."""
    port = port or free_port()
    base_env = dict(os.environ if env is None else env)
    base_env["XLA_FLAGS"] = " ".join(
        [f for f in base_env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    base_env.setdefault("JAX_PLATFORMS", "cpu")
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", module, *train_args,
               f"--config.distributed.coordinator=127.0.0.1:{port}",
               f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={i}"]
        out = open(logs[i], "w") if logs else subprocess.PIPE
        procs.append(subprocess.Popen(cmd, env=base_env | {"LOCAL_RANK": str(i)}, stdout=out,
                                      stderr=subprocess.STDOUT, text=True))
        if logs:
            out.close()  # the child has its own descriptor
    return procs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, train_args = argv[:i], argv[i + 1:]
    else:
        own, train_args = argv, []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=1)
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args(own)
    procs = launch(a.num_processes, train_args, devices_per_process=a.devices_per_process, port=a.port)
    threads = [threading.Thread(target=_pump, args=(str(i), p.stdout, sys.stdout), daemon=True)
               for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
