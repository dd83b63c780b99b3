"""`mm-launch {xpk,jobset,slurm} --name=NAME --workdir=DIR [cluster flags] [--dry-run] -- MM_TRAIN_ARGS`: run one
`mm-train` (its `--config=...` and overrides after `--`) on a TPU / GPU pod through xpk or a GKE JobSet, or on
a SLURM cluster.

    mm-launch xpk --name=iaa-s2 --image=IMG --workdir=gs://b/iaa_s2 --accelerator=v5p-64 --num_slices=2 \\
        --cluster=C --project=P --zone=Z -- --config=configs/iaa.py:stage2,iaa14_llama3_8b \\
        --config.init.checkpoint=gs://b/iaa_s1 --config.data.path=gs://b/captions.json \\
        --config.data.image_root=gs://b/images --config.data.tokenizer=gs://b/llama3-8b
    mm-launch jobset --name=iaa-s2 --image=IMG --workdir=gs://b/iaa_s2 --accelerator=h100-80gb --nodes=4 \\
        --dry-run -- ...
    mm-launch slurm --name=iaa-s2 --workdir=/shared/iaa_s2 --nodes=4 --tasks_per_node=8 --gpus_per_task=1 -- ...

The config and its overrides are checked first (unknown key, bad value, a mesh the devices cannot hold: exit 2),
then the job is rendered (launch/job_specs.py): `--dry-run` prints it (`--out=FILE` also writes it), otherwise it
is submitted with the installed client (`xpk`, `kubectl apply -f -`, `sbatch`). `--cluster_file=F.json` gives
defaults for any of the cluster flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from launch import cli
from launch.job_specs import Job, jobset, sbatch, xpk

_PROG = "mm-launch"
CLIENTS = {"xpk": "xpk", "jobset": "kubectl", "slurm": "sbatch"}


def check_train_args(train_args: Sequence[str], n_devices: int) -> None:
    """ConfigError / ValueError when mm-train would refuse these arguments on `n_devices` devices."""
    from mm.config import ConfigError, load_config_file
    from mm.train import schema as tcfg

    spec = cli._config_spec(train_args, "config")
    if not spec:
        raise ConfigError("mm-train arguments after `--` need --config=configs/X.py[:variant]")
    cfg = load_config_file(spec)
    keys = cli._override_keys(train_args, "config")
    cli.check_override_keys(cfg, keys)
    from absl import flags
    from ml_collections import config_flags

    argv = [_PROG, *[a for a in train_args if a.startswith(("--config", "-config", "--noconfig"))]]
    fv = flags.FlagValues()  # mm-train's own parse of these arguments, apart from any flags of this process
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError(cli._value_error(e, cfg, "config")) from e
    cfg = fv.config
    if "pipeline" in cfg:
        return
    tcfg.validate(cfg, n_devices, pending_paths=tcfg.named_paths(cfg))


def render(kind: str, job: Job, train_args: Sequence[str]) -> str:
    if kind == "xpk":
        return " ".join(shlex.quote(a) for a in xpk(job, train_args)) + "\n"
    if kind == "jobset":
        import yaml

        return yaml.safe_dump(jobset(job, train_args), sort_keys=False)
    return sbatch(job, train_args)


def submit(kind: str, job: Job, train_args: Sequence[str], text: str) -> int:
    client = CLIENTS[kind]
    if shutil.which(client) is None:
        return cli.report(_PROG, f"`{client}` is not installed here; --dry-run prints the {kind} job instead")
    if kind == "xpk":
        r = subprocess.run(xpk(job, train_args))
    elif kind == "jobset":
        r = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True)
    else:
        r = subprocess.run(["sbatch", "--parsable"], input=text, text=True, capture_output=True)
        if r.returncode == 0:
            sys.stdout.write(f"{_PROG}: submitted SLURM job {r.stdout.strip()}\n")
        else:
            sys.stderr.write(r.stderr)
    return r.returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog=_PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(CLIENTS))
    ap.add_argument("--cluster_file", default="", help="JSON with defaults for the flags below")
    for f in dataclasses.fields(Job):
        ap.add_argument(f"--{f.name}", type=type(f.default) if f.default is not dataclasses.MISSING else str,
                        default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default="", help="also write the rendered job here")
    a = ap.parse_args(own)
    try:
        values = json.loads(open(a.cluster_file).read()) if a.cluster_file else {}
        unknown = set(values) - {f.name for f in dataclasses.fields(Job)}
        if unknown:
            raise ValueError(f"{a.cluster_file}: unknown keys {sorted(unknown)}")
        values.update({f.name: getattr(a, f.name) for f in dataclasses.fields(Job) if getattr(a, f.name) is not None})
        if not values.get("name") or not values.get("workdir"):
            raise ValueError("--name and --workdir are required")
        if a.kind != "slurm" and not values.get("image"):
            raise ValueError(f"--image is required for {a.kind}")
        job = Job(**values)
        check_train_args(train_args, job.devices())
        text = render(a.kind, job, train_args)
    except (*cli.input_errors(), ValueError, OSError) as e:
        return cli.report(_PROG, e)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    if a.dry_run:
        sys.stdout.write(text)
        return 0
    return submit(a.kind, job, train_args, text)


if __name__ == "__main__":
    sys.exit(main())
