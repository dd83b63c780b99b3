"""`mm-launch` renders what each platform expects: the xpk flags of `xpk workload create`, a JobSet whose fields
are JobSet's and whose pod template Kubernetes' own API models accept unchanged, and an sbatch script; a bad
config or a mesh the job's devices cannot hold exits 2 before anything is rendered. (The sbatch script running
on a real SLURM: tests/test_slurm.py.)"""

import shlex

import pytest
import yaml

from launch import submit
from launch.job_specs import Job, jobset, sbatch, xpk

TINY = ["--config=configs/tiny_llm.py:full"]
# `xpk workload create` flags (xpk 1.16, xpk/parser/workload.py and common.py)
XPK_FLAGS = {"--workload", "--docker-image", "--cluster", "--project", "--zone", "--tpu-type", "--device-type",
             "--num-slices", "--num-nodes", "--command"}
# JobSet v1alpha2 API (jobset.x-k8s.io): the fields of JobSetSpec, ReplicatedJob, Network, FailurePolicy
JOBSET_SPEC = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
               "coordinator", "managedBy", "ttlSecondsAfterFinished"}
REPLICATED_JOB = {"name", "groupName", "template", "replicas", "dependsOn"}
NETWORK = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
FAILURE_POLICY = {"maxRestarts", "restartStrategy", "rules"}


def _flags(argv):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[3:]}


def test_xpk_tpu_multislice_and_gpu():
    tpu = Job(name="iaa", workdir="gs://b/run", image="img:1", accelerator="v5e-256", num_slices=2, cluster="c")
    argv = xpk(tpu, TINY)
    assert argv[:3] == ["xpk", "workload", "create"]
    f = _flags(argv)
    assert set(f) <= XPK_FLAGS
    assert f["--tpu-type"] == "v5litepod-256" and f["--num-slices"] == "2"  # xpk's name for v5e slices
    cmd = shlex.split(f["--command"])
    assert cmd[0] == "mm-train" and "--workdir=gs://b/run" in cmd and TINY[0] in cmd
    assert not any("distributed" in a for a in cmd)  # TPU pods: jax finds its peers itself

    gpu = Job(name="g", workdir="/w", image="img", accelerator="h100-80gb", nodes=4, gpus_per_node=8)
    f = _flags(xpk(gpu, TINY))
    assert f["--device-type"] == "h100-80gb-8" and f["--num-nodes"] == "4"
    assert "--config.distributed.num_processes=4" in f["--command"]


def _check_job_template(template):
    """Kubernetes' own model of a Job template keeps every field we wrote (an unknown or misspelt one is dropped
    by the deserialiser, so the round trip would differ)."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api._ApiClient__deserialize(template, "V1JobTemplateSpec")
    assert api.sanitize_for_serialization(model) == template


def test_jobset_tpu_multislice_fields():
    job = Job(name="iaa", workdir="gs://b/run", image="img:1", accelerator="v5p-64", num_slices=2)
    js = yaml.safe_load(submit.render("jobset", job, TINY))  # what `kubectl apply` reads
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
    spec = js["spec"]
    assert set(spec) <= JOBSET_SPEC and set(spec["network"]) <= NETWORK
    assert set(spec["failurePolicy"]) <= FAILURE_POLICY
    (rj,) = spec["replicatedJobs"]
    assert set(rj) <= REPLICATED_JOB
    assert rj["replicas"] == 2  # one Job a slice
    _check_job_template(rj["template"])
    t = rj["template"]["spec"]
    assert t["completionMode"] == "Indexed" and t["parallelism"] == t["completions"] == 8  # 32 chips, 4 a host
    pod = t["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"google.com/tpu": "4"}
    env = {e["name"]: e for e in c["env"]}
    # JobSet's pod host names: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain = jobset name>
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"] == "iaa-workers-0-0.iaa"
    assert env["MEGASCALE_NUM_SLICES"]["value"] == "2"
    assert "jobset.sigs.k8s.io/job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_jobset_gpu_coordinator_from_the_headless_service():
    job = Job(name="g", workdir="/w", image="img", accelerator="h100-80gb", nodes=2, gpus_per_node=8)
    js = jobset(job, TINY)
    (rj,) = js["spec"]["replicatedJobs"]
    _check_job_template(rj["template"])
    assert rj["replicas"] == 1 and rj["template"]["spec"]["parallelism"] == 2
    pod = rj["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    cmd = c["command"][2]
    assert "--config.distributed.coordinator=g-workers-0-0.g:1234" in cmd
    assert "--config.distributed.process_id=$(JOB_COMPLETION_INDEX)" in cmd  # Indexed Job: the pod's index


def test_sbatch_script():
    job = Job(name="s", workdir="/shared/run", accelerator="h100-80gb", nodes=4, tasks_per_node=8, gpus_per_task=1,
              partition="gpu", time="24:00:00")
    text = sbatch(job, TINY)
    head = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=s", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                    "#SBATCH --output=/shared/run/slurm-%j.out", "#SBATCH --gpus-per-task=1",
                    "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00"]
    (srun,) = [line for line in text.splitlines() if line.startswith("srun")]
    assert shlex.split(srun) == ["srun", "mm-train", TINY[0], "--workdir=/shared/run"]


@pytest.mark.parametrize("train_args, message", [
    (["--config=configs/tiny_llm.py:full", "--config.trian.steps=3"], "unknown config key"),
    (["--config=configs/tiny_llm.py:full", "--config.mesh.tensor=3"], "mesh"),
    ([], "need --config"),
])
def test_bad_train_args_exit_2_before_rendering(train_args, message, capsys, tmp_path):
    out = tmp_path / "job.sh"
    rc = submit.main(["slurm", "--name=s", "--workdir=/w", "--accelerator=cpu", "--nodes=1", "--tasks_per_node=2",
                      "--dry-run", f"--out={out}", "--", *train_args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-launch: error:") and message in err, err
    assert not out.exists()


def test_dry_run_prints_and_cluster_file(tmp_path, capsys):
    cluster = tmp_path / "cluster.json"
    cluster.write_text('{"image": "img:2", "cluster": "pod", "accelerator": "v5p-8"}')
    rc = submit.main(["xpk", f"--cluster_file={cluster}", "--name=a", "--workdir=/w", "--dry-run", "--", *TINY])
    assert rc == 0
    argv = shlex.split(capsys.readouterr().out)
    f = _flags(argv)
    assert f["--cluster"] == "pod" and f["--docker-image"] == "img:2" and f["--tpu-type"] == "v5p-8"
    cluster.write_text('{"imgae": "x"}')
    assert submit.main(["xpk", f"--cluster_file={cluster}", "--name=a", "--workdir=/w", "--", *TINY]) == 2
    assert "unknown keys ['imgae']" in capsys.readouterr().err


def test_the_documented_xpk_example_is_a_valid_job(capsys):
    """The 8B stage-2 example of mm-launch's docstring (README and docs/training.md show the same one) passes the
    config checks (a stage-2 llava_json run names its data, tokenizer and the stage-1 workdir) and renders."""
    text = submit.__doc__
    lines = text[text.index("mm-launch xpk --name=iaa-s2"):].split("\n")
    lines = lines[:next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\")) + 1]
    argv = shlex.split(" ".join(line.rstrip().rstrip("\\") for line in lines))
    assert argv[:2] == ["mm-launch", "xpk"] and "--dry-run" not in argv
    dash = argv.index("--")
    assert submit.main([*argv[1:dash], "--dry-run", *argv[dash:]]) == 0, capsys.readouterr()
    f = _flags(shlex.split(capsys.readouterr().out))
    assert f["--tpu-type"] == "v5p-64" and "--config.data.path=gs://b/captions.json" in f["--command"]
