"""Config validation: every mistake is an error naming the key, found before anything heavy runs."""

import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from helpers_train import tiny
from mm.config import ConfigError
from mm.train import schema as tcfg

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_stage_configs_validate(tmp_path):
    tcfg.validate(tiny(), n_devices=8)
    for spec in sorted((ROOT / "configs").glob("*.py")):
        if spec.name == "sharding.py":
            continue
        from mm.config import load_config_file

        cfg = load_config_file(str(spec))
        if "pipeline" in cfg:  # demo, soups, bpo: a multi-stage pipeline; its own check validates every stage
            import importlib

            from launch.train import PIPELINES

            importlib.import_module(PIPELINES[cfg.pipeline]).check(cfg, tmp_path / spec.stem)
            continue
        tcfg.validate(cfg)  # no device check: presets target pods


@pytest.mark.parametrize("mutate, key", [
    (lambda c: setattr(c, "train", ml_collections.ConfigDict({**c.train.to_dict(), "steps": "ten"})), "train.steps"),
    (lambda c: setattr(c, "checkpoint", ml_collections.ConfigDict({**c.checkpoint.to_dict(), "use_async": 1})),
     "checkpoint.use_async"),
    (lambda c: c.optim.update({"lr": -1.0}), "optim.lr"),
    (lambda c: c.optim.update({"grad_accum": 3}), "optim.grad_accum"),
    (lambda c: c.model.update({"kind": "gpt"}), "model.kind"),
    (lambda c: c.init.update({"llm_checkpoint": "/nonexistent/ckpt"}), "init.llm_checkpoint"),
    (lambda c: c.init.update({"checkpoint": "/nonexistent/stage1"}), "init.checkpoint"),
    (lambda c: c.model.llm.update({"num_kv_heads": 3}), "model.llm"),
    (lambda c: c.model.llm.update({"hiden_size": 3}), "model.llm.hiden_size"),
    (lambda c: setattr(c, "param_groups", [("(", 1.0)]), "param_groups[0]"),
    (lambda c: setattr(c, "param_groups", [(".*", "frozn")]), "param_groups[0]"),
    (lambda c: c.profile.update({"steps": [5, 2]}), "profile.steps"),
    (lambda c: c.model.update({"ocr_tower": True}), "model.ocr_tower"),  # POINTS' OCR ViT needs kind vlm
    (lambda c: c.model.update({"kind": "vlm", "ocr_weight": 1.5}), "model.ocr_weight"),
    (lambda c: c.init.update({"ocr_vision_checkpoint": "/nonexistent/clip"}), "init.ocr_vision_checkpoint"),
    (lambda c: c.init.update({"checkpoint_renames": [["vision"]]}), "init.checkpoint_renames"),
])
def test_bad_values_name_the_key(mutate, key):
    c = tiny()
    c.unlock()
    mutate(c)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        tcfg.validate(c)


def test_unknown_key_is_an_error_naming_the_nearest_keys():
    c = tiny()
    c.unlock()
    c.optim.lr_warmup = 5
    with pytest.raises(ConfigError) as e:
        tcfg.validate(c)
    assert str(e.value) == "unknown config key 'optim.lr_warmup' (did you mean: optim.warmup_frac?)"
    c = tiny()
    c.unlock()
    c.model.llm.update({"hiden_size": 3})  # model.llm is open to HF fields, but not to fields LLMConfig lacks
    with pytest.raises(ConfigError) as e:
        tcfg.validate(c)
    assert str(e.value) == "unknown config key 'model.llm.hiden_size' (did you mean: model.llm.hidden_size?)"


@pytest.mark.parametrize("mesh, key", [
    (dict(data=3, fsdp=1, tensor=1), "mesh"),
    (dict(data=1, fsdp=-1, tensor=8), "mesh.tensor"),
    (dict(data=-1, fsdp=1, tensor=1), "train.batch_size"),
])
def test_impossible_mesh_shapes(mesh, key):
    c = tiny()
    c.mesh.update(mesh)
    if key == "train.batch_size":
        c.train.batch_size = 4
    with pytest.raises(ConfigError, match=key):
        tcfg.validate(c, n_devices=8)


def test_cli_rejects_a_value_validate_refuses(tmp_path):
    """A value the flags accept but `validate` refuses: the same one line and status 2 as the flag errors of
    tests/test_cli_errors.py (unknown keys, wrong types), before anything is written."""
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "launch.train", "--config=configs/tiny_llm.py:full", f"--workdir={tmp_path}/w"]
    r = subprocess.run(base + ["--config.init.llm_checkpoint=/nope"], cwd=ROOT, capture_output=True, text=True,
                       env=env)
    assert (r.returncode, r.stderr) == (
        2, "mm-train: error: config key init.llm_checkpoint = '/nope': no such file or directory\n"), r.stderr
    assert not (tmp_path / "w").exists()  # nothing heavy started, nothing written
