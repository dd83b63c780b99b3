"""Test-session set-up: 8 simulated CPU devices for sharding tests, set before anything imports jax."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Every test runs with the repository root as working directory, as the README's commands do, so tests
    that name `configs/...` relatively (and subprocesses that inherit the cwd) work however pytest is started
    (`cd /tmp && python -m pytest /path/to/mm/tests/...`)."""
    monkeypatch.chdir(REPO)
