"""A run whose workdir, data, images and tokenizer live on an object store (`gs://` on a local GCS emulator,
which `pathlib` cannot open): it trains, is preempted (SIGTERM), resumes from the bucket and gives bitwise the
losses of the same run on local disk; metrics, TensorBoard events, the profile and the compiled-step report land
in the bucket; `mm-convert export-run` reads the workdir from the bucket and writes the export back to it.
What the run wrote is read with an independent gcsfs client.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.gcs import BUCKET, emulator, filesystem
from tests.train.helpers_train import write_tiny_llava

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 2
OVERRIDES = {"train.steps": STEPS, "train.log_every": 1, "checkpoint.every": EVERY, "checkpoint.keep": 2,
             "checkpoint.use_async": True, "init.prng_impl": "unsafe_rbg", "metrics.tensorboard": True,
             "data.pack": True, "data.workers": 0, "profile.steps": "(1,2)"}


@pytest.fixture(scope="module")
def gcs():
    with emulator() as env:
        yield env


def _env(gcs, tmp_path):
    env = dict(os.environ, **gcs)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _train(env, workdir, data):
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **data}.items()]
    return subprocess.Popen([sys.executable, "-m", "launch.train", "--config=tests/train/helpers_train.py:iaa_llava",
                             f"--workdir={workdir}", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(text):
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    return train


def test_workdir_data_and_export_on_gcs_train_preempt_resume_bitwise(gcs, tmp_path):
    path, root, tok = write_tiny_llava(tmp_path / "local")
    fs = filesystem(gcs)
    fs.put(path, f"{BUCKET}/data/train.json")
    for d, name in ((root, "images"), (tok, "tok")):
        for f in sorted(Path(d).iterdir()):
            fs.put(str(f), f"{BUCKET}/data/{name}/{f.name}")
    env = _env(gcs, tmp_path)
    local = {"data.path": path, "data.image_root": root, "data.tokenizer": tok}
    remote = {"data.path": f"gs://{BUCKET}/data/train.json", "data.image_root": f"gs://{BUCKET}/data/images",
              "data.tokenizer": f"gs://{BUCKET}/data/tok"}
    ref = _train(env, tmp_path / "ref", local)

    run = f"gs://{BUCKET}/run"
    proc = _train(env, run, remote)
    t0 = time.time()
    while not fs.exists(f"{BUCKET}/run/checkpoints/{EVERY}/state"):  # the first save is in the bucket
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() - t0 < 400, "no checkpoint in the bucket after 400 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "mm-train: preempted at step" in out, out[-3000:]
    stopped = int(out.split("preempted at step")[1].split()[0])
    assert EVERY <= stopped < STEPS
    out = _finish(_train(env, run, remote))
    assert f"resumed from {run}/checkpoints/{stopped} " in out, out[-3000:]
    _finish(ref)

    # every step once in the bucket's metrics.jsonl (the resumed run continued the preempted run's file), and
    # bitwise the losses of the local run
    got = _losses(fs.cat(f"{BUCKET}/run/metrics.jsonl").decode())
    want = _losses((tmp_path / "ref" / "metrics.jsonl").read_text())
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == want
    names = {p.split(f"{BUCKET}/run/", 1)[1] for p in fs.find(f"{BUCKET}/run")}
    assert {"config.json", "compiled_step.json"} <= names
    assert any(n.startswith("tensorboard/") and "tfevents" in n for n in names), sorted(names)
    assert any(n.startswith("profile/process_0/") and n.endswith(".xplane.pb") for n in names), sorted(names)
    assert any(n.startswith("profile/process_0/memory_step_") for n in names), sorted(names)
    assert sorted({int(n.split("/")[1]) for n in names if n.startswith("checkpoints/")}) == [STEPS - EVERY, STEPS]
    assert json.loads(fs.cat(f"{BUCKET}/run/compiled_step.json"))["mm_flops_per_device"] > 0

    # export from the bucket into the bucket; the same tensors as the local run's export
    for src, dst in ((run, f"gs://{BUCKET}/export"), (str(tmp_path / "ref"), str(tmp_path / "ref_export"))):
        r = subprocess.run([sys.executable, "-m", "launch.convert", "export-run", f"--src={src}", f"--dst={dst}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    fs.get(f"{BUCKET}/export", str(tmp_path / "gcs_export"), recursive=True)
    import jax

    import mm
    from mm.train import param_groups as pg

    # the same files outside params/ (Orbax names its data files at random), the same arrays inside
    outside_params = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*")  # noqa: E731
                                      if p.is_file() and p.relative_to(d).parts[0] != "params")
    assert outside_params(tmp_path / "gcs_export") == outside_params(tmp_path / "ref_export")
    a, b = (pg.flatten(jax.tree.map(np.asarray, mm.from_pretrained(str(tmp_path / d)).params))
            for d in ("gcs_export", "ref_export"))
    assert a and sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    source = json.loads((tmp_path / "gcs_export" / "mm_config.json").read_text())["source"]
    assert source["workdir"] == run and source["step"] == STEPS
