"""Preemption and exact resume: SIGKILL at a random step (possibly mid async save) then restart gives, step for
step, bitwise the losses of an uninterrupted run; partial checkpoints are never loaded; SIGTERM saves and exits."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path



ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
OVERRIDES = {"train.steps": STEPS, "train.seq_len": 64, "train.log_every": 1, "checkpoint.every": 3,
             "checkpoint.keep": 2, "init.prng_impl": "unsafe_rbg", "metrics.tensorboard": False}


def _env(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like the in-process reference below
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _cmd(workdir):
    return [sys.executable, "-m", "launch.train", "--config=configs/tiny_llm.py:full", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]  # a re-run step overwrites: the last value counts
    return out


def _last_step(workdir) -> int:
    p = Path(workdir) / "metrics.jsonl"
    if not p.exists():
        return 0
    lines = [json.loads(x) for x in p.read_text().splitlines() if x.endswith("}")]
    return max((r["step"] for r in lines if r["kind"] == "train"), default=0)


def _start(tmp_path, workdir):
    return subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, k, timeout=120):
    t0 = time.time()
    while _last_step(workdir) < k:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout
        time.sleep(0.002)


def test_sigterm_then_sigkill_at_random_step_then_resume_is_bitwise_identical(tmp_path):
    """Reference run and interrupted run side by side (both subprocesses on one CPU device: the same program).

    The interrupted run gets SIGTERM (must save and exit 0), is restarted, gets SIGKILL at a random later
    step (possibly mid async save), has a half-written checkpoint dir planted, and is restarted to the end.
    """
    ref_dir, workdir = tmp_path / "ref", tmp_path / "run"
    ref = _start(tmp_path, ref_dir)
    proc = _start(tmp_path, workdir)
    _wait_for_step(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out, out[-2000:]
    stopped = int(out.split("preempted at step")[1].split()[0])
    assert stopped < STEPS
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped

    k = random.Random().randint(stopped + 1, STEPS - 3)
    proc = _start(tmp_path, workdir)
    _wait_for_step(proc, workdir, k)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert "resumed from" in out
    killed_at = _last_step(workdir)
    # a half-written save must never be picked up: leave one behind, as a crash mid-save would
    fake = workdir / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1234567"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "state").mkdir(exist_ok=True)
    r = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout, r.stdout[-2000:]
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    reference, got = _losses(ref_dir), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == reference, f"SIGTERM at {stopped}, SIGKILL after {killed_at}: " + str(
        {s: (got[s], reference[s]) for s in got if got[s] != reference[s]})
    # keep-N: only the newest checkpoints remain
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) <= 2 and steps[-1] == STEPS
