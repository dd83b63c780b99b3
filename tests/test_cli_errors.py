"""Bad input to the console commands (`python -m launch.<cmd>`, so the real flag parsing runs): exit status 2
and one line on stderr naming the key / flag / file - for `--config.*` keys the valid keys near it - and
nothing heavy before it. Every command runs with JAX_PLATFORMS=bogus: had anything initialised a JAX backend
(device init, model build), the command would have died with a RuntimeError traceback and status 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = ("checkpoint, data, distributed, dpo, init, mesh, metrics, model, name, optim, param_groups, profile, "
            "rules, train")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="bogus", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _one_line(r: subprocess.CompletedProcess, expected: str) -> None:
    assert (r.returncode, r.stderr) == (2, expected + "\n"), (r.returncode, r.stderr[-3000:])


TRAIN_CASES = [  # (flags, the line after "mm-train: error: ")
    (["--config=configs/tiny_llm.py:full", "--config.train.setps=3"],
     "unknown config key 'train.setps' (did you mean: train.steps?)"),
    (["--config=configs/tiny_llm.py:full", "--config.optim.lrr=1"],
     "unknown config key 'optim.lrr' (did you mean: optim.lr?)"),
    (["--config=configs/tiny_llm.py:full", "--config.nosuchsection.x=1"],
     f"unknown config key 'nosuchsection.x' (valid keys at the top: {TOP_KEYS})"),
    (["--config=configs/tiny_llm.py:full", "--config.train.steps.x=1"],
     "config key 'train.steps.x': 'train.steps' is a value (20), not a section"),
    (["--config=configs/tiny_llm.py:full", "--config.train.steps=abc"],
     "config key 'train.steps' = 'abc': expected int (the config has 20)"),
    (["--config=configs/tiny_llm.py:full", "--config.checkpoint.use_async=maybe"],
     "config key 'checkpoint.use_async' = 'maybe': expected bool (the config has True)"),
    (["--config=configs/tiny_llm.py:full", "--config.model.iaa_positions=(0, 1.5)"],  # parsed; schema says no
     "config key 'model.iaa_positions' = (0, 1.5): expected list of int"),
    (["--config=configs/nosuch.py"], "configs/nosuch.py: config file not found"),
    (["--config=configs/tiny_llm.py:nosuch"],
     "configs/tiny_llm.py: unknown variant 'nosuch'; choose one of ['full', 'head', 'last_layer']"),
    (["--config=configs/tiny_llm.py:full", "--wrkdir=/tmp/x"],
     "Unknown command line flag 'wrkdir'. Did you mean: workdir ?"),
    (["--config=configs/demo.py", "--config.quick=maybe"],  # the demo pipeline's own keys (mm.stepz: its test)
     "config key 'quick' = 'maybe': expected bool (the config has False)"),
]


@pytest.mark.parametrize("args, expected", TRAIN_CASES, ids=[a[-1] for a, _ in TRAIN_CASES])
def test_mm_train_config_errors(tmp_path, args, expected):
    r = _cli("launch.train", *args, f"--workdir={tmp_path / 'w'}")
    _one_line(r, f"mm-train: error: {expected}")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("spec, start", [
    ("configs/iaa.py:nosuchstage", "configs/iaa.py: unknown stage 'nosuchstage'; choose"),
    ("configs/iaa.py:stage1,nosuchpreset", "configs/iaa.py:stage1,nosuchpreset: unknown preset 'nosuchpreset'; "),
], ids=["stage", "preset"])
def test_mm_train_unknown_stage_or_preset(tmp_path, spec, start):
    """The stage and preset lists belong to configs/iaa.py and mm.train.presets; the line names the bad one."""
    r = _cli("launch.train", f"--config={spec}", f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 2 and r.stderr.startswith(f"mm-train: error: {start}"), r.stderr[-3000:]
    assert r.stderr.count("\n") == 1


def test_mm_convert_errors(tmp_path):
    nope, dst = tmp_path / "nope", tmp_path / "out"
    _one_line(_cli("launch.convert", "hf-to-mm", "--src", str(nope), "--dst", str(dst)),
              f"mm-convert hf-to-mm: error: {nope}: not a directory")
    _one_line(_cli("launch.convert", "mm-to-hf", "--src", str(nope), "--dst", str(dst)),
              f"mm-convert mm-to-hf: error: {nope}/mm_config.json: not found")
    _one_line(_cli("launch.convert", "export-run", "--src", str(nope), "--dst", str(dst)),
              f"mm-convert export-run: error: {nope}: no config.json (not an mm-train workdir)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {"setps": 3}}')  # a hand-edited workdir
    _one_line(_cli("launch.convert", "export-run", "--src", str(run), "--dst", str(dst)),
              f"mm-convert export-run: error: {run}/config.json: unknown config key 'train.setps' "
              "(did you mean: train.steps?)")
    r = _cli("launch.convert", "hf-to-mm", "--src", str(nope), "--dst", str(dst), "--dtype", "int8")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "mm-convert hf-to-mm: error: argument --dtype: invalid choice: 'int8' "
        "(choose from 'keep', 'float32', 'bfloat16', 'float16')"), r.stderr
    assert not dst.exists()


def test_mm_data_and_mm_sizes_errors(tmp_path):
    nope, out, not_json = tmp_path / "nope", tmp_path / "shards", tmp_path / "rows.json"
    not_json.write_text("no rows here\n")
    _one_line(_cli("launch.data", "pack", "--json", str(nope), "--out", str(out)),
              f"mm-data pack: error: --json {nope}: no such file or directory")
    _one_line(_cli("launch.data", "pack", "--json", str(not_json), "--out", str(out)),
              f"mm-data pack: error: {not_json}: not a JSON list or JSONL file "
              "(Expecting value: line 1 column 1 (char 0))")
    _one_line(_cli("launch.data", "stats", "--json", str(not_json), "--tokenizer", str(nope)),
              f"mm-data stats: error: --tokenizer {nope}: no such file or directory")
    r = _cli("launch.data", "stats", "--json", str(not_json), "--tokenizer", str(tmp_path), "--max-len", "abc")
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "mm-data stats: error: argument --max-len: invalid int value: 'abc'"), r.stderr
    assert not out.exists()
    _one_line(_cli("launch.sizes", "--model", "iaa14", "--llm", str(nope)), f"mm-sizes: error: {nope}: not found")
