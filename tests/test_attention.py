"""The attention dispatcher: backend choice, every implementation against the XLA reference, the cuDNN mask
plumbing, and the Pallas kernels inside `shard_map` / under a mesh on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mm.attention as attn
from mm.attention import attention, cudnn_attention, xla_attention
from mm.sharding import make_mesh

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _qkv(b=2, t=24, s=24, hq=4, hkv=2, d=64, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, hq, d), dtype), jax.random.normal(kk, (b, s, hkv, d), dtype),
            jax.random.normal(kv, (b, s, hkv, d), dtype))


def _packed_masks(b=2, t=24):
    seg = np.ones((b, t), np.int32)
    seg[:, 10:] = 2
    seg[0, -3:] = 0
    bid = np.zeros((b, t), np.int32)
    bid[:, 1:6] = 1
    return {"segment_ids": jnp.asarray(seg), "bidirectional_ids": jnp.asarray(bid)}


@pytest.mark.parametrize("backend,want", [("cpu", "xla"), ("gpu", "pallas_gpu"), ("cuda", "pallas_gpu"),
                                          ("tpu", "pallas_tpu")])
def test_default_implementation_per_backend(monkeypatch, backend, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attn.default_implementation() == want


def test_default_on_cpu_is_the_xla_path():
    q, k, v = _qkv()
    np.testing.assert_array_equal(attention(q, k, v), xla_attention(q, k, v))


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_through_dispatcher(impl):
    q, k, v = _qkv()
    masks = _packed_masks()
    f = jax.jit(lambda q, k, v, m: attention(q, k, v, implementation=impl, interpret=True, block_sizes=None, **m))
    got = f.lower(q, k, v, masks).compile(FAST_COMPILE)(q, k, v, masks)
    np.testing.assert_allclose(got, xla_attention(q, k, v, **masks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["plain-causal", "non-causal", "packed", "offset-keypad"])
def test_cudnn_mask_plumbing(case):
    """cuDNN needs a GPU; the same `jax.nn.dot_product_attention` call with jax's XLA implementation checks
    that our masks (incl. zeroed fully masked rows) are handed over right."""
    q, k, v = _qkv()
    kw: dict = {"causal": case != "non-causal"}
    if case == "packed":
        kw.update(_packed_masks())
    if case == "offset-keypad":
        q = q[:, :4]
        kseg = np.ones((2, 24), np.int32)
        kseg[1, -5:] = 0
        kw.update(q_offset=jnp.asarray([10, 19]), segment_ids=jnp.ones((2, 4), jnp.int32),
                  kv_segment_ids=jnp.asarray(kseg))
    got = cudnn_attention(q, k, v, sdpa_implementation="xla", **kw)
    np.testing.assert_allclose(got, xla_attention(q, k, v, **kw), atol=1e-5, rtol=0)


def test_cudnn_rejects_float32_with_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="cudnn attention needs bfloat16"):
        attention(q, k, v, implementation="cudnn")


def test_unknown_implementation_and_bad_heads_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'flash' is not one of"):
        attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        attention(q[:, :, :3], k, v)


# --------------------------------------------------------------------------------------- sharding
def _mesh():
    assert jax.device_count() >= 8, "tests/conftest.py must give 8 simulated CPU devices"
    return make_mesh((2, 2, 2), devices=jax.devices()[:8])


# The TPU interpreter (pltpu.InterpretParams) hangs inside shard_map over several simulated CPU devices in
# jax 0.10.2, so the sharded runs use the GPU kernel in interpret mode; the shard_map wrapping is the same.
@pytest.mark.parametrize("impl", ["pallas_gpu"])
def test_inside_shard_map_equals_unsharded(impl):
    """Batch over (data, fsdp), heads over tensor; values and gradients equal the unsharded XLA path."""
    mesh = _mesh()
    q, k, v = _qkv(b=4, t=20, s=20, hq=4, hkv=2)
    masks = _packed_masks(b=4, t=20)
    qkv_spec, tok_spec = P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None)

    def loss(fn, q, k, v, masks):
        return jnp.sum(jnp.sin(fn(q, k, v, masks)))

    def sharded(q, k, v, masks):
        body = lambda q, k, v, m: attention(q, k, v, implementation=impl, interpret=True, **m)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, tok_spec),
                             out_specs=qkv_spec, check_vma=False)(q, k, v, masks)

    def both(fn, q, k, v, masks):
        return fn(q, k, v, masks), jax.grad(lambda *a: loss(fn, *a, masks), argnums=(0, 1, 2))(q, k, v)

    got = jax.jit(lambda *a: both(sharded, *a)).lower(q, k, v, masks).compile(FAST_COMPILE)(q, k, v, masks)
    want = both(lambda q, k, v, m: xla_attention(q, k, v, **m), q, k, v, masks)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_under_a_mesh_runs_per_shard_and_equals_unsharded():
    """Under `jax.set_mesh` + jit (how the models run) the dispatcher shard_maps the kernel itself."""
    mesh = _mesh()
    q, k, v = _qkv(b=4, t=20, s=20, hq=4, hkv=2)
    masks = _packed_masks(b=4, t=20)
    shard = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, shard) for x in (q, k, v))
    f = jax.jit(lambda q, k, v, m: attention(q, k, v, implementation="pallas_gpu", interpret=True, **m))
    with jax.set_mesh(mesh):
        lowered = f.lower(q, k, v, masks)
        got = lowered.compile(FAST_COMPILE)(q, k, v, masks)
    assert "shard_map" in str(lowered.as_text()) or "manual" in lowered.as_text().lower()
    np.testing.assert_allclose(got, xla_attention(q, k, v, **masks), atol=1e-5, rtol=0)
