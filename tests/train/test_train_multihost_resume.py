"""Two CPU processes (jax.distributed, gloo; one device each) on the Grain pipeline (`data.kind=llava_json`,
packing, async saves): each process saves and restores its own data iterator state; a SIGTERM to one process
makes both save the same step and exit 0 (JAX's preemption sync); a SIGKILL of both at a random step and a restart
give bitwise the losses of an uninterrupted 2-process run. A 2-process checkpoint restores exactly onto 1 device
and onto a 4-device fsdp mesh, and a 1-process run resumed from it reads the global order from the first position
either saved process had not consumed."""

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch.local_cluster import launch
from tests.train.helpers_train import write_tiny_llava

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 3
CONFIG = "tests/train/helpers_train.py:iaa_llava"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path, root, tok = write_tiny_llava(tmp_path_factory.mktemp("llava_mh"))
    return {"data.path": path, "data.image_root": root, "data.tokenizer": tok}


def _args(data, workdir, **extra):
    over = {"train.steps": STEPS, "train.log_every": 1, "checkpoint.every": EVERY, "checkpoint.use_async": True,
            "data.pack": True, "data.workers": 0, "metrics.tensorboard": False, **data, **extra}
    return [f"--config={CONFIG}", f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in over.items()]]


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache_mh"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)
    return env


def _start(tmp_path, data, workdir, tag, n=2, **extra):
    logs = [str(tmp_path / f"{tag}_{i}.log") for i in range(n)]
    return launch(n, _args(data, workdir, **extra), env=_env(tmp_path), logs=logs), logs


def _wait(procs, logs, timeout=600):
    t0 = time.time()
    for p in procs:
        p.wait(timeout=max(timeout - (time.time() - t0), 1))
    return [Path(f).read_text() for f in logs]


def _rows(workdir) -> dict[int, dict]:
    out = {}
    p = Path(workdir) / "metrics.jsonl"
    for line in (p.read_text().splitlines() if p.exists() else []):
        if line.endswith("}"):
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r
    return out


def _wait_for_step(procs, logs, workdir, k, timeout=400):
    t0 = time.time()
    while max(_rows(workdir), default=0) < k:
        for p, f in zip(procs, logs):
            assert p.poll() is None, Path(f).read_text()[-3000:]
        assert time.time() - t0 < timeout, f"no step {k} after {timeout}s"
        time.sleep(0.01)


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _data_files(workdir, step):
    d = Path(workdir) / "checkpoints" / str(step) / "data"
    return {f.name: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted 2-process run, every checkpoint kept."""
    tmp = tmp_path_factory.mktemp("mh_ref")
    procs, logs = _start(tmp, data, tmp / "ref", "ref", **{"checkpoint.keep": 100})
    outs = _wait(procs, logs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return tmp / "ref"


def test_sigterm_to_one_process_then_sigkill_of_both_resume_bitwise(data, reference, tmp_path):
    workdir = tmp_path / "run"
    procs, logs = _start(tmp_path, data, workdir, "a")
    _wait_for_step(procs, logs, workdir, 2)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    outs = _wait(procs, logs)
    stopped = set()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "mm-train: preempted at step" in out, out[-3000:]
        stopped.add(int(out.split("preempted at step")[1].split()[0]))
    assert len(stopped) == 1, f"the processes stopped at different steps {stopped}"
    stopped = stopped.pop()
    assert stopped < STEPS and _steps(workdir)[-1] == stopped
    files = _data_files(workdir, stopped)
    assert sorted(files) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert [f["process_index"] for f in files.values()] == [0, 1]
    assert files["process_0-of-2.json"]["pipeline"] != files["process_1-of-2.json"]["pipeline"]  # own shards

    k = random.Random().randint(stopped + 1, STEPS - 2)
    procs, logs = _start(tmp_path, data, workdir, "b")
    _wait_for_step(procs, logs, workdir, k)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    outs = _wait(procs, logs)
    assert all(p.returncode == -signal.SIGKILL for p in procs), [o[-2000:] for o in outs]
    assert f"resumed from {workdir / 'checkpoints'}/{stopped} " in outs[0], outs[0][-3000:]
    good = _steps(workdir)[-1]
    assert max(_rows(workdir)) < STEPS

    procs, logs = _start(tmp_path, data, workdir, "c")
    outs = _wait(procs, logs)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{good} " in outs[0], outs[0][-3000:]
    want, got = _rows(reference), _rows(workdir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    keys = ["loss", "grad_norm", *sorted(k for k in want[STEPS] if k.startswith("data/"))]
    diff = {(s, k): (got[s][k], want[s][k]) for s in got for k in keys if got[s][k] != want[s][k]}
    assert not diff, f"(resumed, uninterrupted) differ: {diff}"
    assert _data_files(workdir, STEPS) == _data_files(reference, STEPS)


def _build(data, n_devices, mesh):
    from mm.config import load_config_file
    from mm.train import loop

    cfg = load_config_file(CONFIG)
    cfg.unlock()
    for k, v in data.items():
        cfg.data[k.split(".")[1]] = v
    cfg.mesh.update(mesh)
    cfg.train.batch_size = 4 * n_devices  # rows for every device (the state's shapes do not depend on it)
    return cfg, loop.build(cfg, log=False, devices=jax.devices()[:n_devices], abstract=True)


def test_two_process_checkpoint_restores_onto_other_meshes_and_process_counts(data, reference, tmp_path):
    import orbax.checkpoint as ocp

    from mm.train.checkpoint import Checkpointer
    from mm.train.grain_source import GrainSource, read_rows
    import grain

    step = 2 * EVERY
    # the reference: Orbax alone reads the saved arrays onto one device
    d = reference / "checkpoints" / str(step) / "state"
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = ocp.StandardCheckpointer().metadata(d).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    saved = jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(d, target))
    for n, mesh in ((4, {"data": 1, "fsdp": -1}), (1, {"data": 1})):
        cfg, b = _build(data, n, mesh)
        ck = Checkpointer(reference, keep=100)
        state, data_states, _ = ck.restore(step, b.state)
        ck.close()
        assert isinstance(data_states, list) and len(data_states) == 2  # written by 2 processes, read by 1
        flat_saved = jax.tree_util.tree_leaves_with_path(saved)
        flat_got = jax.tree.leaves(state)
        assert len(flat_saved) == len(flat_got)
        for (path, want), got in zip(flat_saved, flat_got):
            assert got.sharding.mesh.devices.size == n
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{n} devices: {jax.tree_util.keystr(path)}")

    # the data order on 1 process: the global order (Grain's shuffle of the rows, repeated) from the first
    # position either process had not consumed, every row of it in turn
    g = min(s["position"] for s in data_states)
    assert all(s["position"] % 2 == i for i, s in enumerate(data_states))  # process i read positions i, i+2, ...
    src = GrainSource(cfg, process_index=0, process_count=1)
    src.restore(data_states)
    assert src.step == step and src.pipe.start == g
    rows = read_rows(cfg.data.path)
    order = grain.MapDataset.source(rows).shuffle(seed=src.dcfg.seed).repeat(None)
    maker = src._maker  # row -> example; the order is what is tested here
    batch = next(src.pipe)
    first_row = batch["input_ids"][0][batch["segment_ids"][0] == 1]
    expected = next(e for e in (maker(order[i]) for i in range(g, g + 8)) if "skip" not in e)
    np.testing.assert_array_equal(first_row, np.asarray(expected["ids"]))
    src.close()

    # and a whole 1-process run resumes from the 2-process checkpoint and finishes
    workdir = tmp_path / "one"
    shutil.copytree(reference, workdir)
    for s in _steps(workdir):
        if s > step:
            shutil.rmtree(workdir / "checkpoints" / str(s))
    procs, logs = _start(tmp_path, data, workdir, "one", n=1)
    out = _wait(procs, logs)[0]
    assert procs[0].returncode == 0, out[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{step} " in out, out[-3000:]
    assert sorted(_data_files(workdir, STEPS)) == ["process_0-of-1.json"]
