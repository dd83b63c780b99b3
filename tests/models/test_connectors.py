"""Projectors (vs torch), pixel shuffle (vs DESIGN.md's index formula), dual-encoder merge (vs the parts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mm.config import ConfigError, VisionConfig
from mm.models import vision as V
from mm.config import ProjectorConfig
from mm.models.connectors import DualEncoder, DualEncoderConfig, Projector, pixel_shuffle


def _init(cfg: ProjectorConfig, seed: int = 0):
    p = Projector(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, cfg.in_dim)))["params"]
    import flax.linen as nn
    p = nn.unbox(p)
    # non-zero biases so a dropped bias cannot pass
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), p)


@pytest.mark.parametrize("kind, depth", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_matches_torch(kind, depth):
    cfg = ProjectorConfig(kind=kind, in_dim=12, out_dim=20)
    params = _init(cfg)
    assert sorted(params) == [f"linear_{k}" for k in range(depth)]
    assert params["linear_0"]["kernel"].shape == (12, 20)
    mods = []
    for k in range(depth):
        lin = torch.nn.Linear(12 if k == 0 else 20, 20)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(params[f"linear_{k}"]["kernel"]).T.copy()))
            lin.bias.copy_(torch.from_numpy(np.array(params[f"linear_{k}"]["bias"])))
        mods += ([torch.nn.GELU()] if k else []) + [lin]
    ref_mod = torch.nn.Sequential(*mods) if depth > 1 else mods[0]
    x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
    ours = np.asarray(Projector(cfg).apply({"params": params}, x))
    with torch.no_grad():
        ref = ref_mod(torch.from_numpy(x)).numpy()
    assert float(np.max(np.abs(ours - ref))) <= 1e-5


def test_projector_identity_and_bad_configs():
    cfg = ProjectorConfig(kind="identity", in_dim=8, out_dim=8)
    x = jnp.arange(16.0).reshape(1, 2, 8)
    assert np.array_equal(np.asarray(Projector(cfg).apply({"params": {}}, x)), np.asarray(x))
    for bad in [dict(kind="mlp2x_relu"), dict(kind="identity", in_dim=4, out_dim=8), dict(kind="mlp0x_gelu")]:
        with pytest.raises(ConfigError):
            ProjectorConfig(**bad)
    assert ProjectorConfig.from_json_dict(ProjectorConfig().to_json_dict()) == ProjectorConfig()
    with pytest.raises(ValueError, match="in_dim"):
        Projector(ProjectorConfig(kind="linear", in_dim=4, out_dim=4)).init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))


@pytest.mark.parametrize("grid", [(24, 24), (4, 6), (2, 2)])
def test_pixel_shuffle_channel_order(grid):
    h, w = grid
    n, c = 2, 5
    x = np.random.default_rng(0).standard_normal((n, h * w, c)).astype(np.float32)
    out = np.asarray(pixel_shuffle(jnp.asarray(x), grid))
    assert out.shape == (n, h * w // 4, 4 * c)
    xg = x.reshape(n, h, w, c)
    expected = np.zeros((n, h // 2, w // 2, 4 * c), np.float32)
    for i in range(h // 2):
        for j in range(w // 2):
            for m in range(2):
                for k in range(2):
                    expected[:, i, j, (2 * m + k) * c:(2 * m + k + 1) * c] = xg[:, 2 * i + m, 2 * j + k]
    assert np.array_equal(out, expected.reshape(n, -1, 4 * c))


def test_pixel_shuffle_rejects_bad_grids():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(jnp.zeros((1, 10, 3)))
    with pytest.raises(ValueError, match="even"):
        pixel_shuffle(jnp.zeros((1, 9, 3)))
    assert pixel_shuffle(jnp.zeros((1, 576, 3))).shape == (1, 144, 12)


VC = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28, patch_size=7)


def _dual(weight: float) -> tuple[DualEncoderConfig, dict]:
    cfg = DualEncoderConfig(general=VC, ocr=VC, projector=ProjectorConfig(in_dim=64, out_dim=24), weight=weight)
    import flax.linen as nn
    params = jax.jit(DualEncoder(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 3, 28, 28)))
    params = nn.unbox(params)["params"]
    return cfg, params


def test_dual_encoder_merges_after_projection():
    cfg, params = _dual(0.3)
    assert set(params) == {"general_vision_tower", "ocr_vision_tower", "projector"}
    # every layer of both towers has params (init runs all of them even though features stop at -2)
    assert set(params["general_vision_tower"]["encoder"]) == {"layers_0", "layers_1"}
    assert set(params["ocr_vision_tower"]["encoder"]) == {"layers_0", "layers_1"}
    px = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32))
    out = np.asarray(jax.jit(DualEncoder(cfg).apply)({"params": params}, px))
    assert out.shape == (2, 4, 24)  # 4x4 patch grid -> 2x2 after shuffle

    def branch(tower_params):
        hs = V.hidden_states(tower_params, VC, px)
        feats = pixel_shuffle(jnp.asarray(hs[-2][:, 1:]), (4, 4))
        return np.asarray(Projector(cfg.projector).apply({"params": params["projector"]}, feats))

    g, o = branch(params["general_vision_tower"]), branch(params["ocr_vision_tower"])
    assert not np.allclose(g, o)
    np.testing.assert_allclose(out, 0.3 * g + 0.7 * o, atol=1e-5, rtol=0)
    cfg1 = DualEncoderConfig(general=VC, ocr=VC, projector=cfg.projector, weight=1.0)
    out1 = jax.jit(DualEncoder(cfg1).apply)({"params": params}, px)
    np.testing.assert_allclose(np.asarray(out1), g, atol=1e-5, rtol=0)


def test_dual_encoder_config_checks():
    with pytest.raises(ConfigError, match="in_dim"):
        DualEncoderConfig(general=VC, ocr=VC, projector=ProjectorConfig(in_dim=16, out_dim=8))
    with pytest.raises(ConfigError, match="share"):
        DualEncoderConfig(general=VC, ocr=VC.replace(hidden_size=32), projector=ProjectorConfig(in_dim=64, out_dim=8))
    with pytest.raises(ConfigError, match="weight"):
        DualEncoderConfig(general=VC, ocr=VC, projector=ProjectorConfig(in_dim=64, out_dim=8), weight=1.5)
