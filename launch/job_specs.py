"""What `mm-launch` submits: an xpk command, a GKE JobSet manifest or a SLURM batch script for one `mm-train` run.

A `Job` is the cluster description (accelerator, slices or nodes, image, workdir, names); `train_args` are
mm-train's own (`--config=...` and overrides). Start-up per platform (`mm.sharding.cluster_environment`):
- TPU (xpk, JobSet): nothing to pass, jax reads the TPU worker environment GKE provides; several slices get the
  Megascale variables (coordinator = the first pod of the first slice, via the JobSet's headless service);
- GPU on GKE: explicit coordinator (pod 0 of the replicated job through the headless service), process count
  and id (`JOB_COMPLETION_INDEX`);
- SLURM: nothing to pass, jax reads the `srun` task environment.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from typing import Any, Sequence

# GKE accelerator node label per TPU generation; chips a host on multi-host slices
_TPU = {"v4": ("tpu-v4-podslice", 4), "v5p": ("tpu-v5p-slice", 4), "v5e": ("tpu-v5-lite-podslice", 4),
        "v6e": ("tpu-v6e-slice", 4)}
COORDINATOR_PORT = 1234


@dataclasses.dataclass
class Job:
    name: str
    workdir: str
    image: str = ""
    accelerator: str = "v5p-8"  # a TPU slice (v5p-64, v5e-256, ...), a GPU (h100-80gb, a100-80gb), or cpu
    num_slices: int = 1  # TPU slices
    nodes: int = 1  # GPU / CPU hosts
    gpus_per_node: int = 8
    tasks_per_node: int = 1  # SLURM: processes a node (one a GPU, or several CPU processes)
    gpus_per_task: int = 0
    cluster: str = ""
    project: str = ""
    zone: str = ""
    partition: str = ""
    time: str = ""  # SLURM time limit, e.g. 24:00:00
    output: str = ""  # SLURM log file (default WORKDIR/slurm-%j.out)

    @property
    def is_tpu(self) -> bool:
        return self.accelerator.split("-")[0] in _TPU

    def tpu(self) -> dict[str, Any]:
        """Generation, chips and hosts a slice, the GKE topology label."""
        from mm.train.aot import TOPOLOGIES

        gen = self.accelerator.split("-")[0]
        topo = TOPOLOGIES.get(self.accelerator)
        if topo is None:
            raise ValueError(f"--accelerator={self.accelerator}: unknown TPU slice; one of {sorted(TOPOLOGIES)}")
        dims = topo.split(":")[1]
        chips = math.prod(int(x) for x in dims.split("x"))
        per_host = min(chips, 8) if chips <= 8 and gen in ("v5e", "v6e") else min(chips, _TPU[gen][1])
        return {"gen": gen, "topology": dims, "chips": chips, "hosts": chips // per_host, "chips_per_host": per_host}

    def devices(self) -> int:
        """jax devices the run sees (what the config's mesh must fit)."""
        if self.is_tpu:
            return self.tpu()["chips"] * self.num_slices
        if self.accelerator == "cpu":
            return self.nodes * self.tasks_per_node
        return self.nodes * self.gpus_per_node


def _train_command(job: Job, train_args: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return ["mm-train", *train_args, f"--workdir={job.workdir}", *extra]


def xpk(job: Job, train_args: Sequence[str]) -> list[str]:
    """`xpk workload create ...` as argv."""
    cmd = ["xpk", "workload", "create", f"--workload={job.name}", f"--docker-image={job.image}"]
    cmd += [f"--cluster={job.cluster}"] if job.cluster else []
    cmd += [f"--project={job.project}"] if job.project else []
    cmd += [f"--zone={job.zone}"] if job.zone else []
    if job.is_tpu:
        job.tpu()  # a known slice
        cmd += [f"--tpu-type={job.accelerator.replace('v5e-', 'v5litepod-')}", f"--num-slices={job.num_slices}"]
        extra: list[str] = []
    else:
        cmd += [f"--device-type={job.accelerator}-{job.gpus_per_node}", f"--num-nodes={job.nodes}"]
        extra = _gpu_distributed(job)
    cmd.append("--command=" + " ".join(shlex.quote(a) for a in _train_command(job, train_args, extra)))
    return cmd


def _gpu_distributed(job: Job) -> list[str]:
    """Explicit jax.distributed flags for GPU pods: pod 0 through the JobSet's headless service."""
    return [f"--config.distributed.coordinator={job.name}-workers-0-0.{job.name}:{COORDINATOR_PORT}",
            f"--config.distributed.num_processes={job.nodes}",
            "--config.distributed.process_id=$(JOB_COMPLETION_INDEX)"]


def jobset(job: Job, train_args: Sequence[str]) -> dict[str, Any]:
    """A JobSet (jobset.x-k8s.io/v1alpha2) with one replicated job `workers`: a TPU slice (or the GPU nodes)
    per replica, one indexed pod a host."""
    env: list[dict[str, Any]] = []
    if job.is_tpu:
        t = job.tpu()
        hosts, replicas = t["hosts"], job.num_slices
        selector = {"cloud.google.com/gke-tpu-accelerator": _TPU[t["gen"]][0],
                    "cloud.google.com/gke-tpu-topology": t["topology"]}
        resources = {"limits": {"google.com/tpu": str(t["chips_per_host"])}}  # a Kubernetes quantity
        extra: list[str] = []
        if job.num_slices > 1:
            env = [{"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{job.name}-workers-0-0.{job.name}"},
                   {"name": "MEGASCALE_NUM_SLICES", "value": str(job.num_slices)},
                   {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
                       "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}}]
    else:
        hosts, replicas = job.nodes, 1
        selector = {"cloud.google.com/gke-accelerator": f"nvidia-{job.accelerator}"}
        resources = {"limits": {"nvidia.com/gpu": str(job.gpus_per_node)}}
        extra = _gpu_distributed(job)
    command = " ".join(shlex.quote(a) if "$(" not in a else a for a in _train_command(job, train_args, extra))
    container = {"name": "mm-train", "image": job.image, "command": ["bash", "-c", command],
                 "ports": [{"containerPort": COORDINATOR_PORT}], "resources": resources}
    if env:
        container["env"] = env
    pod = {"metadata": {"labels": {"app": job.name}},
           "spec": {"restartPolicy": "Never", "nodeSelector": selector,
                    "containers": [container]}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": job.name},
            "spec": {"failurePolicy": {"maxRestarts": 0}, "network": {"enableDNSHostnames": True},
                     "replicatedJobs": [{"name": "workers", "replicas": replicas, "template": {"spec": {
                         "parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
                         "backoffLimit": 0, "template": pod}}}]}}


def sbatch(job: Job, train_args: Sequence[str]) -> str:
    """A SLURM batch script: one `srun` of mm-train, one task a process."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={job.tasks_per_node}",
             f"#SBATCH --output={job.output or job.workdir.rstrip('/') + '/slurm-%j.out'}"]
    lines += [f"#SBATCH --gpus-per-task={job.gpus_per_task}"] if job.gpus_per_task else []
    lines += [f"#SBATCH --partition={job.partition}"] if job.partition else []
    lines += [f"#SBATCH --time={job.time}"] if job.time else []
    lines += ["", "# jax.distributed reads the srun task environment: no coordinator flags", "set -euo pipefail"]
    srun = ["srun"] + ([f"--container-image={job.image}"] if job.image else [])
    lines.append(" ".join(shlex.quote(a) for a in srun + _train_command(job, train_args)))
    return "\n".join(lines) + "\n"
