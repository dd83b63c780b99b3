"""A real one-node SLURM on this machine for tests: Debian's `slurm-wlm` and `munge` (installed when missing, as
.ci/run does up front), a munge daemon, and `slurmctld` + `slurmd` on a config in a temporary directory.

    with one_node_cluster(tmp_path) as env:   # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

from launch.local_cluster import free_port
from tests.debian import ensure


def _munge() -> None:
    ensure("munged", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["/usr/sbin/mungekey", "--create"], check=True, capture_output=True)
        shutil.chown(key, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)


CONF = """ClusterName=mmtest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
MpiDefault=none
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextlib.contextmanager
def one_node_cluster(tmp: Path, timeout: float = 60) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        raise RuntimeError("a test SLURM cluster needs root (slurmd runs jobs as their user)")
    ensure("slurmctld", "slurm-wlm")
    _munge()
    d = Path(tmp) / "slurm"
    (d / "state").mkdir(parents=True)
    (d / "spool").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(CONF.format(host=host, d=d, cpus=os.cpu_count(), ctl_port=free_port(), d_port=free_port()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs = [subprocess.Popen([b, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for b in ("slurmctld", "slurmd")]
    try:
        t0 = time.time()
        while True:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                break
            if time.time() - t0 > timeout or any(p.poll() is not None for p in procs):
                logs = "\n".join(f.read_text()[-2000:] for f in d.glob("*.log"))
                raise RuntimeError(f"SLURM did not come up ({r.stdout.strip()!r} {r.stderr.strip()!r}):\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for_job(job_id: str, env: dict[str, str], timeout: float = 600) -> None:
    """Returns once `job_id` has left the queue (squeue no longer lists it)."""
    t0 = time.time()
    while True:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
        if r.returncode != 0 or not r.stdout.strip():
            return
        if time.time() - t0 > timeout:
            subprocess.run(["scancel", job_id], env=env)
            raise TimeoutError(f"SLURM job {job_id} still {r.stdout.strip()} after {timeout}s")
        time.sleep(1)
