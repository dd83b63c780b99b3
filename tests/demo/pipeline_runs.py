"""Runs a pipeline config through `mm-train` in a subprocess, shortened (`--config.quick=True`), as a user
would: one CPU device, the repo on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mm_train(config: str, workdir: Path, *flags: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))  # one CPU device, as on a user's machine
    cmd = [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}", "--config.quick=True",
           *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def quick_run(config: str, workdir: Path) -> tuple[Path, str]:
    """(workdir, stdout) of a finished quick run; fails the test with the output's tail otherwise."""
    proc = mm_train(config, workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout
