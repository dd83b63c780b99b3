"""Projectors (vs torch), pixel shuffle (vs DESIGN.md's index formula), the merge of several sources (vs the parts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mm.config import ConfigError
from mm.config import ProjectorConfig
from mm.models.connectors import Projector, pixel_shuffle


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


def test_projector_merges_sources_after_projection():
    """POINTS' shared projector: sources side by side on the last axis, each projected, merged w / 1 - w."""
    one = ProjectorConfig(in_dim=8, out_dim=6)
    two = ProjectorConfig(in_dim=8, out_dim=6, merge=(0.3, 0.7))
    params = Projector(one).init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 8)))
    a, b = (jnp.asarray(np.random.default_rng(s).standard_normal((2, 5, 8)), jnp.float32) for s in (1, 2))
    got = Projector(two).apply(params, jnp.concatenate([a, b], -1))
    pa, pb = Projector(one).apply(params, a), Projector(one).apply(params, b)
    assert not np.allclose(pa, pb)
    np.testing.assert_allclose(np.asarray(got), np.asarray(0.3 * pa + 0.7 * pb), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 source"):
        Projector(two).apply(params, a)
