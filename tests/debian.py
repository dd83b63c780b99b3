"""Debian tools some tests read their reference with (e.g. `go tool pprof` for device memory profiles):
found on PATH, or installed with apt when missing (CI's .ci/run installs them up front)."""

import os
import shutil
import subprocess


def ensure(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` first if it is not on PATH."""
    found = shutil.which(binary)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (sudo + ["apt-get", "update", "-qq"], sudo + ["apt-get", "install", "-y", "-qq", package]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"`{binary}` is missing and `{' '.join(cmd)}` failed: {r.stderr[-1000:]}")
    found = shutil.which(binary)
    if not found:
        raise RuntimeError(f"installed Debian package {package}, still no `{binary}` on PATH")
    return found


def pprof_raw(path) -> str:
    """`go tool pprof -raw` of a pprof file: the reference reader of the format."""
    go = ensure("go", "golang-go")
    r = subprocess.run([go, "tool", "pprof", "-raw", str(path)], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"go tool pprof could not read {path}: {r.stderr[-2000:]}")
    return r.stdout
