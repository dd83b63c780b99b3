"""Parity of `mm.models.vision.VisionTower` with transformers' CLIPVisionModel / SiglipVisionModel (float32,
every hidden state <= 1e-4), position interpolation, feature selection and per-layer parameter paths."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from mm.config import ConfigError, VisionConfig
from mm.convert.hf_vision import hf_state_to_params, params_to_hf_state, vision_config_from_hf
from mm.models import vision as V

TOL = 1e-4


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF init leaves norms at 1/0 and biases at 0, which would hide mapping mistakes: draw every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if name.endswith("layernorm.weight") or "layer_norm" in name and name.endswith(
                "weight") or "layrnorm.weight" in name else noise * 2)
    return model.eval()


def _clip(hidden_act: str = "quick_gelu", image_size: int = 28, patch: int = 7, layers: int = 3) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=image_size, patch_size=patch, hidden_act=hidden_act)
    return _randomise(CLIPVisionModel(cfg), 0)


def _siglip(use_head: bool = True, image_size: int = 32, patch: int = 8, layers: int = 3) -> SiglipVisionModel:
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=image_size, patch_size=patch, vision_use_head=use_head)
    return _randomise(SiglipVisionModel(cfg), 1)


def _to_mm(model: torch.nn.Module) -> tuple[VisionConfig, dict]:
    config = vision_config_from_hf(model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return config, hf_state_to_params(config, state, "torch model")


def _reference(model: torch.nn.Module, pixels: np.ndarray, interpolate: bool = False):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True,
                     interpolate_pos_encoding=interpolate)


def _assert_parity(model: torch.nn.Module, pixels: np.ndarray, interpolate: bool = False) -> None:
    config, params = _to_mm(model)
    ref = _reference(model, pixels, interpolate)
    ours = V.hidden_states(params, config, pixels, interpolate)
    assert len(ours) == len(ref.hidden_states) == config.num_layers + 1
    for i, (a, b) in enumerate(zip(ours, ref.hidden_states)):
        err = float(np.max(np.abs(a - b.numpy())))
        assert a.shape == tuple(b.shape) and err <= TOL, f"hidden state {i}: max abs diff {err}"
    last = V.last_hidden_state(params, config, pixels, interpolate)
    np.testing.assert_allclose(last, ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
    pooled = V.pooler_output(params, config, pixels, interpolate)
    if ref.pooler_output is None:
        assert pooled is None
    else:
        np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=TOL, rtol=0)


def _pixels(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_parity(act):
    _assert_parity(_clip(act), _pixels(2, 28, 28))


def test_clip_parity_non_divisible_patch():
    """Image size not a multiple of the patch: the convolution drops the remainder, as HF's does."""
    _assert_parity(_clip(image_size=30, patch=7), _pixels(1, 30, 30))


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_parity(use_head):
    _assert_parity(_siglip(use_head), _pixels(2, 32, 32))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_parity_at_the_release_resolution_336_patch_14(kind):
    """The release's tower geometry (CLIP ViT-L/14-336: a 24x24 grid, 576 patches, plus CLS for CLIP), on a
    narrow, 2-layer tower so it stays fast. SigLIP has no CLS and takes the same 336/14 shape (576 positions)."""
    model = _clip(image_size=336, patch=14, layers=2) if kind == "clip" else _siglip(image_size=336, patch=14,
                                                                                     layers=2)
    pixels = _pixels(2, 336, 336, seed=3)
    _assert_parity(model, pixels)  # every hidden state, last hidden state and pooled output within 1e-4
    config, params = _to_mm(model)
    ref = _reference(model, pixels).hidden_states
    cls = 1 if kind == "clip" else 0
    assert tuple(ref[0].shape) == (2, 24 * 24 + cls, 32)  # transformers' token count, not ours
    hs = V.hidden_states(params, config, pixels)
    patch = V.select_features(hs, -2, "patch", has_class_token=kind == "clip")
    assert patch.shape == (2, 576, 32)
    err = float(np.max(np.abs(np.asarray(patch) - ref[-2][:, cls:].numpy())))
    assert err <= TOL, err
    feats = np.asarray(V.image_features(params, config, pixels, layer=-2))
    assert feats.shape == (2, 576, 32)
    np.testing.assert_allclose(feats, ref[-2][:, cls:].numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("hw", [(42, 35), (14, 21)])
def test_clip_position_interpolation(hw):
    _assert_parity(_clip(), _pixels(1, *hw), interpolate=True)


@pytest.mark.parametrize("hw", [(48, 40)])
def test_siglip_position_interpolation(hw):
    _assert_parity(_siglip(), _pixels(1, *hw), interpolate=True)


def test_bicubic_matrix_matches_torch():
    src = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for out in [(3, 8), (5, 5), (11, 7)]:
        ref = torch.nn.functional.interpolate(src, size=out, mode="bicubic", align_corners=False)[0, 0].numpy()
        ours = V.bicubic_matrix(5, out[0]) @ src[0, 0].numpy() @ V.bicubic_matrix(5, out[1]).T
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_wrong_size_without_interpolation_is_an_error():
    config, params = _to_mm(_clip())
    with pytest.raises(ValueError, match=r"doesn't match model"):
        V.hidden_states(params, config, _pixels(1, 35, 35), interpolate_pos_encoding=False)


def test_feature_selection_and_early_exit():
    model = _clip(layers=3)
    config, params = _to_mm(model)
    pixels = _pixels(2, 28, 28)
    ref = _reference(model, pixels).hidden_states
    hs = V.hidden_states(params, config, pixels)
    patch = V.select_features(hs, -2, "patch", has_class_token=True)
    np.testing.assert_allclose(patch, ref[-2][:, 1:].numpy(), atol=TOL, rtol=0)
    assert patch.shape == (2, 16, 32)
    assert V.select_features(hs, -2, "cls_patch", has_class_token=True).shape == (2, 17, 32)
    # image_features runs only the layers it needs and matches the selected hidden state.
    for layer in (-2, 0):
        feats = np.asarray(V.image_features(params, config, pixels, layer=layer))
        np.testing.assert_allclose(feats, ref[layer][:, 1:].numpy(), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        V.select_features(hs, 4, "patch", has_class_token=True)
    with pytest.raises(ValueError, match="class token"):
        V.select_features(hs, -2, "cls_patch", has_class_token=False)


def test_siglip_features_keep_every_token():
    model = _siglip()
    config, params = _to_mm(model)
    pixels = _pixels(1, 32, 32)
    feats = np.asarray(V.image_features(params, config, pixels, layer=-2))
    np.testing.assert_allclose(feats, _reference(model, pixels).hidden_states[-2].numpy(), atol=TOL, rtol=0)
    assert feats.shape == (1, 16, 32)


def test_every_param_has_logical_axes():
    for c in (VisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=28,
                           patch_size=7),
              VisionConfig(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, image_size=32, patch_size=8, use_head=True, hidden_act="gelu_pytorch_tanh")):
        boxed = V.abstract_params(c)
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
        assert leaves and all(hasattr(x, "names") and len(x.names) == len(x.value.shape) for x in leaves)
        from mm.sharding import LOGICAL_AXES
        assert {n for x in leaves for n in x.names if n is not None} <= set(LOGICAL_AXES)


def test_layer_paths_are_stable_and_distinct():
    """POINTS trains only the last 3 ViT layers: a regex over param paths must select exactly those."""
    c = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=5, num_heads=2, image_size=14, patch_size=7)

    def paths(params):
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "names"))[0]
        return ["/".join(k.key for k in kp) for kp, _ in flat]

    a = paths(V.abstract_params(c))
    assert paths(V.abstract_params(c)) == a  # stable: the same paths in the same order on every build
    assert len(set(a)) == len(a)  # distinct
    per_layer = {i: {p.split("/", 2)[2] for p in a if p.startswith(f"encoder/layers_{i}/")} for i in range(5)}
    assert all(per_layer[i] == per_layer[0] and len(per_layer[0]) == 16 for i in range(5))  # same leaves per layer
    last3 = re.compile(r"^encoder/layers_(2|3|4)/")
    chosen = [p for p in a if last3.search(p)]
    assert len(chosen) == 3 * 16 and {p.split("/")[1] for p in chosen} == {"layers_2", "layers_3", "layers_4"}


def test_config_round_trips_and_rejects_bad_input():
    for model in (_clip(), _siglip()):
        c = vision_config_from_hf(model.config.to_dict())
        assert VisionConfig.from_hf_dict(c.to_hf_dict()) == c
        assert VisionConfig.from_json_dict(c.to_json_dict()) == c
    full = {"model_type": "clip", "vision_config": _clip().config.to_dict()}
    assert VisionConfig.from_hf_dict(full).model_type == "clip_vision_model"
    with pytest.raises(ConfigError, match="model_type"):
        VisionConfig.from_hf_dict({"model_type": "vit"}, "x/config.json")
    with pytest.raises(ConfigError, match="unknown keys"):
        VisionConfig.from_json_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="hidden_act"):
        VisionConfig(hidden_act="relu")


def test_state_dict_round_trip_is_exact():
    for model in (_clip(), _siglip(True)):
        config, params = _to_mm(model)
        back = params_to_hf_state(config, params, hf_prefix="")
        state = model.state_dict()
        assert set(back) == set(state)
        for k, v in state.items():
            assert np.array_equal(back[k], v.numpy()), k
