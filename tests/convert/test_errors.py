"""Bad input stops with a `ConversionError` naming the tensor / file, before anything is written, and no
partial `--dst` (or staging directory) is ever left behind."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.checkpoints.errors import ConversionError
from mm.convert.registry import hf_to_mm, load, mm_to_hf
from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.safetensors_io import INDEX_FILE
from tests.helpers.hf_models import make_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("hf"), "qwen2-untied")


def edited_copy(base, dst, edit):
    """A copy of the checkpoint whose single safetensors file went through `edit(dict) -> dict`."""
    shutil.copytree(base, dst)
    tensors = edit(load_file(str(dst / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def assert_nothing_left(dst):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def _drop(name):
    def edit(t):
        del t[name]
        return t
    return edit


def _add(name):
    def edit(t):
        t[name] = torch.zeros(3)
        return t
    return edit


def _reshape(name):
    def edit(t):
        t[name] = torch.zeros(t[name].shape[0] + 1, *t[name].shape[1:])
        return t
    return edit


@pytest.mark.parametrize("edit, name, words", [
    (_drop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight", "missing"),
    (_add("model.layers.0.self_attn.extra.weight"), "model.layers.0.self_attn.extra.weight", "unexpected"),
    (_reshape("model.layers.0.self_attn.k_proj.weight"), "model.layers.0.self_attn.k_proj.weight", "wrongly shaped"),
    (_reshape("model.layers.1.self_attn.q_proj.bias"), "model.layers.1.self_attn.q_proj.bias", "wrongly shaped"),
])
def test_bad_tensors_raise_naming_them_and_write_nothing(tmp_path, base, edit, name, words):
    src = edited_copy(base, tmp_path / "src", edit)
    dst = tmp_path / "out" / "mm"
    with pytest.raises(ConversionError, match=words) as e:
        hf_to_mm(src, dst, progress=False)
    assert name in str(e.value)
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def test_rope_buffers_are_ignored(tmp_path, base):
    src = edited_copy(base, tmp_path / "src", _add("model.layers.0.self_attn.rotary_emb.inv_freq"))
    hf_to_mm(src, tmp_path / "mm", progress=False)


def test_integer_tensor_is_rejected(tmp_path, base):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        return t
    src = edited_copy(base, tmp_path / "src", edit)
    with pytest.raises(ConversionError, match="model.norm.weight"):
        hf_to_mm(src, tmp_path / "mm", progress=False)


def test_index_naming_a_missing_shard(tmp_path):
    src = make_model(tmp_path, "llama-gqa", max_shard_size="60KB")
    index = json.loads((src / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    with pytest.raises(ConversionError, match=victim):
        hf_to_mm(src, tmp_path / "mm", progress=False)
    assert_nothing_left(tmp_path / "mm")


def test_existing_dst_is_an_error_unless_overwrite(tmp_path, base):
    dst = tmp_path / "mm"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_mm(base, dst, progress=False)
    assert (dst / "keep.txt").exists()
    hf_to_mm(base, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / mmd.MM_CONFIG_FILE).exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        mm_to_hf(dst, hf, progress=False)
    assert not list(hf.iterdir())


def test_failure_while_writing_leaves_no_dst(tmp_path, base, monkeypatch):
    calls = []
    real_add = mmd.ParamWriter.add

    def failing_add(self, unit):
        calls.append(unit)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_add(self, unit)

    monkeypatch.setattr(mmd.ParamWriter, "add", failing_add)
    with pytest.raises(OSError, match="simulated"):
        hf_to_mm(base, tmp_path / "mm", progress=False)
    assert_nothing_left(tmp_path / "mm")


def test_mm_side_mismatch_is_named(tmp_path, base):
    mm = hf_to_mm(base, tmp_path / "mm", progress=False)
    manifest = json.loads((mm / mmd.MM_CONFIG_FILE).read_text())
    manifest["llm"]["num_layers"] = 3
    (mm / mmd.MM_CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="layers_2/mlp/down_proj/kernel"):
        mm_to_hf(mm, tmp_path / "hf", progress=False)
    assert_nothing_left(tmp_path / "hf")
    with pytest.raises(ConversionError, match="missing params"):
        load(mm)[1]
    manifest["format_version"] = 99
    (mm / mmd.MM_CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="format_version"):
        load(mm)[1]


def test_unsupported_hf_config_is_named(tmp_path, base):
    src = tmp_path / "src"
    shutil.copytree(base, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="hidden_act"):
        hf_to_mm(src, tmp_path / "mm", progress=False)
    assert_nothing_left(tmp_path / "mm")
