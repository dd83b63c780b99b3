"""Preemption and exact resume through the CLI (`python -m launch.train`, subprocesses on one CPU device).

SIGTERM saves and exits 0. SIGKILL lands while an async checkpoint save is in flight - the moment Orbax's
temporary step directory appears, before it is renamed into place: the half-written step is never loaded, the
previous checkpoint is intact, and the restarted run gives, step for step, bitwise the losses (and data
counters) of an uninterrupted run and ends with its exact state. Twice: on the synthetic source, and on the
Grain pipeline (`data.kind=llava_json`, packing, two worker processes).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.helpers_train import write_tiny_llava

ROOT = Path(__file__).resolve().parents[2]
# Orbax writes step N into `N.orbax-checkpoint-tmp...` and renames it to `N` once complete (a literal here: the
# name on disk is what this test watches for).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
EVERY = 3
COMMON = {"train.log_every": 1, "checkpoint.every": EVERY, "checkpoint.keep": 2, "checkpoint.use_async": True,
          "init.prng_impl": "unsafe_rbg", "metrics.tensorboard": False}
KEEP_ALL = {"checkpoint.keep": 100}  # the reference keeps every step, to compare intermediate checkpoints with
TEXT = ("configs/tiny_llm.py:full", {**COMMON, "train.steps": 24, "train.seq_len": 64})


def _env(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device in every run: the same program for reference and resumed run
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _cmd(run, workdir, **extra):
    config, overrides = run
    return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in {**overrides, **extra}.items()]]


def _start(tmp_path, run, workdir, **extra):
    # own session: SIGKILL goes to the process group, Grain's workers included, as when a host is preempted
    return subprocess.Popen(_cmd(run, workdir, **extra), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _train_rows(workdir) -> dict[int, dict]:
    out = {}
    p = Path(workdir) / "metrics.jsonl"
    for line in (p.read_text().splitlines() if p.exists() else []):
        if line.endswith("}"):  # a killed run may leave a torn last line
            r = json.loads(line)
            if r["kind"] == "train":
                out[r["step"]] = r  # a re-run step overwrites: the last value counts
    return out


def _last_step(workdir) -> int:
    return max(_train_rows(workdir), default=0)


def _wait_for_step(proc, workdir, k, timeout=240):
    t0 = time.time()
    while _last_step(workdir) < k:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, f"no step {k} after {timeout}s"
        time.sleep(0.01)


def _steps(workdir) -> list[int]:
    """Finished checkpoints on disk."""
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _kill_mid_save(proc, workdir, step, timeout=240) -> str:
    """SIGKILLs the run the moment Orbax's temporary directory for `step` appears (its async save in flight),
    then checks that the kill really came before that save committed and before the run's end."""
    ck = Path(workdir) / "checkpoints"
    t0 = time.time()
    while not any(n.startswith(f"{step}{TMP_SUFFIX}") for n in (os.listdir(ck) if ck.is_dir() else ())):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, f"no save of step {step} after {timeout}s"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out[-3000:])
    assert step not in _steps(workdir), f"step {step} committed before the kill landed"
    assert any(n.startswith(f"{step}{TMP_SUFFIX}") for n in os.listdir(ck))  # the half-written save is left
    return out


def _checkpoint(workdir, step):
    """(state as numpy arrays, data-iterator state) of a finished checkpoint, read with Orbax alone."""
    import orbax.checkpoint as ocp

    d = Path(workdir) / "checkpoints" / str(step)
    state = ocp.StandardCheckpointer().restore(d / "state")
    data = {f.name: json.loads(f.read_text()) for f in (d / "data").glob("process_*.json")}  # Grain's, one a process
    assert list(data) == ["process_0-of-1.json"]
    return jax.tree.map(np.asarray, state), data


def _assert_same_checkpoint(workdir, ref_dir, step):
    got, want = _checkpoint(workdir, step), _checkpoint(ref_dir, step)
    assert jax.tree.structure(got[0]) == jax.tree.structure(want[0])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[0]), jax.tree.leaves(want[0])):
        np.testing.assert_array_equal(a, b, err_msg=f"step {step}: {jax.tree_util.keystr(path)}")
    assert got[1] == want[1], f"step {step}: data state differs"
    assert int(got[0]["step"]) == step


def _assert_resumed_exactly(workdir, ref_dir, steps, keys=("loss",)):
    reference, got = _train_rows(ref_dir), _train_rows(workdir)
    assert sorted(got) == sorted(reference) == list(range(1, steps + 1))
    for k in keys:
        diff = {s: (got[s][k], reference[s][k]) for s in got if got[s][k] != reference[s][k]}
        assert not diff, f"{k} (resumed, uninterrupted) differ at steps {diff}"
    _assert_same_checkpoint(workdir, ref_dir, steps)


def test_sigterm_then_sigkill_mid_async_save_then_resume_is_bitwise_identical(tmp_path):
    """SIGTERM (must save and exit 0), restart, SIGKILL during the async save of a random later step, restart
    to the end; an uninterrupted reference runs alongside."""
    steps = TEXT[1]["train.steps"]
    ref_dir, workdir = tmp_path / "ref", tmp_path / "run"
    ref = _start(tmp_path, TEXT, ref_dir, **KEEP_ALL)
    proc = _start(tmp_path, TEXT, workdir)
    _wait_for_step(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "preempted at step" in out, out[-2000:]
    stopped = int(out.split("preempted at step")[1].split()[0])
    assert stopped < steps and _steps(workdir)[-1] == stopped

    # a save whose previous one is a periodic save (comparable with the reference), and early enough that the
    # run cannot have logged its last step before the kill (it runs at most EVERY steps past the save)
    saves = [s for s in range(EVERY, steps, EVERY) if s - EVERY > stopped and s + EVERY < steps]
    assert saves, f"SIGTERM landed too late (step {stopped}) to leave a save to kill"
    k = random.Random().choice(saves)
    proc = _start(tmp_path, TEXT, workdir)
    out = _kill_mid_save(proc, workdir, k)
    assert f"resumed from {workdir / 'checkpoints'}/{stopped} " in out, out[-2000:]
    assert _last_step(workdir) < steps
    good = _steps(workdir)[-1]
    assert good == k - EVERY
    _finish(ref)
    _assert_same_checkpoint(workdir, ref_dir, good)  # the last good checkpoint is intact

    out = _finish(subprocess.Popen(_cmd(TEXT, workdir), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))
    assert f"resumed from {workdir / 'checkpoints'}/{good} " in out, out[-2000:]
    _assert_resumed_exactly(workdir, ref_dir, steps)
    # keep-N: only the newest checkpoints remain
    assert _steps(workdir) == [steps - EVERY, steps]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path, root, tok = write_tiny_llava(tmp_path_factory.mktemp("llava_resume"))
    over = {**COMMON, "train.steps": 12, "data.path": path, "data.image_root": root, "data.tokenizer": tok,
            "data.pack": True, "data.workers": 2}
    return "tests/train/helpers_train.py:iaa_llava", over


def test_grain_pipeline_with_workers_sigkill_mid_async_save_resumes_exactly(llava, tmp_path):
    steps = llava[1]["train.steps"]
    ref_dir, workdir = tmp_path / "ref", tmp_path / "run"
    ref = _start(tmp_path, llava, ref_dir, **KEEP_ALL)
    k = 2 * EVERY  # its previous save is a periodic one, and the run cannot reach its last step before the kill
    assert k + EVERY < steps
    _kill_mid_save(_start(tmp_path, llava, workdir), workdir, k)
    assert _last_step(workdir) < steps
    assert _steps(workdir) == [EVERY]
    _finish(ref)
    _assert_same_checkpoint(workdir, ref_dir, EVERY)  # intact, with the Grain iterator state and skip counters

    out = _finish(subprocess.Popen(_cmd(llava, workdir), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))
    assert f"resumed from {workdir / 'checkpoints'}/{EVERY} " in out, out[-2000:]
    # the data iterator resumed where it was: same batches (losses) and the same skip counters at every step
    rows = _train_rows(ref_dir)
    counters = sorted(k for k in rows[steps] if k.startswith("data/"))
    assert "data/skipped/corrupt_image" in counters and rows[steps]["data/used"] > 0
    _assert_resumed_exactly(workdir, ref_dir, steps, keys=("loss", "grad_norm", *counters))
