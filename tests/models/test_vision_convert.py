"""HF <-> mm conversion of CLIP / SigLIP vision towers through checkpoint directories: every HF layout
(transformers >= 5.24 bare `CLIPVisionModel` / `SiglipVisionModel`, hub `vision_model.` prefix, full
`CLIPModel` / `SiglipModel`), exact round trips, transformers loading our export, parity of the converted
tower, clear errors."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipConfig, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel)

from mm.checkpoints.errors import ConversionError
from flax.traverse_util import flatten_dict as flatten

from mm.convert import hf_vision
from mm.convert.registry import hf_to_mm, load, mm_to_hf, read_config
from mm.models import vision as V
from tests.helpers.tower_naming import both_namings, set_tower_module

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _build(kind: str, path):
    """Saves a tiny random HF model of `kind` and returns (model's vision tower, directory)."""
    if kind == "clip_vision":
        m = CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=7, **TINY))
    elif kind == "siglip_vision":
        m = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **TINY))
    elif kind == "clip_full":
        m = CLIPModel(CLIPConfig(vision_config=dict(image_size=28, patch_size=7, **TINY), text_config=TEXT,
                                 projection_dim=8))
    elif kind == "siglip_full":
        m = SiglipModel(SiglipConfig(vision_config=dict(image_size=32, patch_size=8, **TINY), text_config=TEXT))
    else:
        raise ValueError(kind)
    _randomise(m)
    m.save_pretrained(path)
    tower = m.vision_model if kind.endswith("full") else m
    return tower, path


def _pixels(config, seed=0):
    s = config.image_size
    return np.random.default_rng(seed).standard_normal((2, 3, s, s)).astype(np.float32)


def _check_parity(tower, config, params):
    px = _pixels(config)
    with torch.no_grad():
        ref = tower(pixel_values=torch.from_numpy(px), output_hidden_states=True)
    ours = V.hidden_states(params, config, px)
    errs = [float(np.max(np.abs(a - b.numpy()))) for a, b in zip(ours, ref.hidden_states)]
    assert len(ours) == len(ref.hidden_states) and max(errs) <= 1e-4, errs
    np.testing.assert_allclose(V.last_hidden_state(params, config, px), ref.last_hidden_state.numpy(), atol=1e-4)


def _tower_tensors(tower) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tower.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("kind", ["clip_vision", "clip_vision_hub", "siglip_vision", "clip_full", "siglip_full"])
def test_hf_to_mm_to_hf(kind, tmp_path):
    tower, src = _build(kind.replace("_hub", ""), tmp_path / "hf")
    if kind.endswith("_hub"):
        assert set_tower_module(src, with_module=True) > 0  # the hub layout, whatever transformers wrote
    mm_dir = hf_to_mm(src, tmp_path / "mm", progress=False)
    config, params = load(mm_dir)
    assert config == read_config(mm_dir)
    _check_parity(tower, config, params)
    direct_config, direct = load(src)
    assert direct_config == config
    _check_parity(tower, direct_config, direct)

    out = mm_to_hf(mm_dir, tmp_path / "back", progress=False)
    written = load_file(out / "model.safetensors")
    expected = _tower_tensors(tower)
    assert set(written) == {f"vision_model.{k}" for k in expected}
    for k, v in expected.items():
        assert np.array_equal(written[f"vision_model.{k}"], v), k  # exact
    cls = SiglipVisionModel if "siglip" in kind else CLIPVisionModel
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _check_parity(reloaded.eval(), config, params)


def _assert_same_params(a, b) -> None:
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k  # exact


@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision"])
def test_tower_with_or_without_the_vision_model_module_loads_the_same(kind, tmp_path):
    """transformers >= 5.24 saves the tower without `vision_model.`, hub checkpoints with it: both load, to
    exactly the same params, and convert to the same mm directory."""
    tower, src = _build(kind, tmp_path / "hf")
    dirs = both_namings(src, tmp_path / "named")
    (ca, a), (cb, b) = load(dirs[True]), load(dirs[False])
    assert ca == cb
    _assert_same_params(a, b)
    _check_parity(tower, cb, b)
    mm_a = load(hf_to_mm(dirs[True], tmp_path / "mm_a", progress=False))
    mm_b = load(hf_to_mm(dirs[False], tmp_path / "mm_b", progress=False))
    assert mm_a[0] == mm_b[0]
    _assert_same_params(mm_a[1], mm_b[1])
    _assert_same_params(a, mm_b[1])


@pytest.mark.parametrize("with_module", [True, False])
@pytest.mark.parametrize("kind", ["clip_vision", "siglip_vision"])
def test_an_unexpected_tower_tensor_is_named_with_its_file(kind, with_module, tmp_path):
    _, src = _build(kind, tmp_path / "hf")
    d = both_namings(src, tmp_path / "named")[with_module]
    f = d / "model.safetensors"
    tensors = load_file(f)
    bogus = ("vision_model." if with_module else "") + "encoder.layers.0.self_attn.extra.weight"
    tensors[bogus] = np.zeros((4, 4), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    want = rf"{re.escape(str(d))}: unexpected tensors \['{re.escape(bogus)} in model\.safetensors'\]"
    with pytest.raises(ConversionError, match=want):
        load(d)
    with pytest.raises(ConversionError, match=want):
        hf_to_mm(d, tmp_path / "mm", progress=False)
    assert not (tmp_path / "mm").exists()


def test_bfloat16_round_trip_is_exact(tmp_path):
    tower, src = _build("siglip_vision", tmp_path / "hf")
    f = src / "model.safetensors"
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(f).items()}
    save_file(bf, f, metadata={"format": "pt"})
    mm_dir = hf_to_mm(src, tmp_path / "mm", progress=False)
    assert read_config(mm_dir).param_dtype == "bfloat16"
    out = mm_to_hf(mm_dir, tmp_path / "back", progress=False)
    back = load_file(out / "model.safetensors")
    for k, v in bf.items():
        assert back[f"vision_model.{k}"].dtype == v.dtype and np.array_equal(back[f"vision_model.{k}"], v), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_errors_name_the_problem(tmp_path):
    _, src = _build("clip_vision", tmp_path / "hf")
    f = src / "model.safetensors"
    tensors = load_file(f)
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensors \['encoder\.layers\.1\.mlp\.fc2\.bias'\]"):
        hf_to_mm(src, tmp_path / "mm", progress=False)
    assert not (tmp_path / "mm").exists()
    with pytest.raises(ConversionError, match=r"q_proj\.weight: \[8, 8\]"):
        load(src)
    save_file({"foo.weight": np.zeros(3, np.float32)}, f, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="no vision tower found"):
        load(src)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type='llama'"):
        hf_vision.open_hf(src)  # the vision family's own reader (the registry would take it as an LLM)


def test_existing_destination_is_refused(tmp_path):
    _, src = _build("clip_vision", tmp_path / "hf")
    (tmp_path / "mm").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_mm(src, tmp_path / "mm", progress=False)


def test_mm_convert_cli_and_kind_registry(tmp_path):
    """`mm-convert` dispatches CLIP/SigLIP directories to the vision family; mm_dir knows kind 'vision'."""
    from launch.convert import main

    tower, src = _build("clip_full", tmp_path / "hf")
    assert main(["hf-to-mm", "--src", str(src), "--dst", str(tmp_path / "mm"), "--no-progress"]) == 0
    config = read_config(tmp_path / "mm")
    assert config == read_config(tmp_path / "mm")
    _check_parity(tower, config, load(tmp_path / "mm")[1])
    assert main(["mm-to-hf", "--src", str(tmp_path / "mm"), "--dst", str(tmp_path / "back"), "--no-progress"]) == 0
    written = load_file(tmp_path / "back" / "model.safetensors")
    for k, v in _tower_tensors(tower).items():
        assert np.array_equal(written[f"vision_model.{k}"], v), k
    assert main(["hf-to-mm", "--src", str(src), "--dst", str(tmp_path / "mm"), "--no-progress"]) == 2  # exists
