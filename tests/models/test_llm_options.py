"""Run-time options of the decoder must not change what it computes: layer scan, remat, caches, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm.config import ConfigError, LLMConfig
from mm.models import llm

CFG = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=1,
                head_dim=8, rope_theta=500000.0)


@pytest.fixture(scope="module")
def setup():
    params = llm.init_params(CFG, jax.random.PRNGKey(1))
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    logits, _ = llm.LLM(CFG).apply({"params": params}, ids)
    return params, ids, np.asarray(logits)


def _logits_and_grad(cfg, params, ids):
    def loss(p):
        logits, _ = llm.LLM(cfg).apply({"params": p}, ids)
        return jax.nn.log_softmax(logits)[..., 0].mean(), logits
    (val, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


@pytest.mark.parametrize("remat", ["none", "full", "dots", "save_qkv_proj"])
def test_scan_and_remat_compute_the_same_function(setup, remat):
    params, ids, ref = setup
    base_logits, base_grads = _logits_and_grad(CFG, params, ids)
    cfg = dataclasses.replace(CFG, scan_layers=True, remat_policy=remat)
    scanned = llm.scan_params(params, CFG.num_layers)
    logits, grads = _logits_and_grad(cfg, scanned, ids)
    np.testing.assert_allclose(logits, base_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
    unscanned = llm.unscan_params(grads, CFG.num_layers)
    for a, b in zip(jax.tree.leaves(unscanned), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_scanned_init_has_layer_axis_named():
    cfg = dataclasses.replace(CFG, scan_layers=True)
    abstract = llm.abstract_params(cfg)
    q = abstract["layers"]["layer"]["self_attn"]["q_proj"]["kernel"]
    assert q.value.shape == (3, 32, 4, 8) and q.names == ("layers", "embed", "heads", "head_dim")
    assert set(jax.tree.map(lambda x: 0, llm.unscan_params(llm.scan_params(
        llm.init_params(CFG, jax.random.PRNGKey(0)), 3), 3))) >= {"layers_0", "layers_2", "norm"}


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_forward(setup, scan):
    params, ids, ref = setup
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    p = llm.scan_params(params, 3) if scan else params
    model = llm.LLM(cfg)
    cache = llm.init_cache(cfg, 2, 32)
    kv_mask = jnp.ones((2, 32), jnp.int32)
    prompt = 10
    logits, cache = model.apply({"params": p}, ids[:, :prompt], segment_ids=jnp.ones((2, prompt), jnp.int32),
                                kv_segment_ids=kv_mask, cache=cache, cache_index=0)
    steps = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        pos = jnp.full((2, 1), t, jnp.int32)
        lg, cache = model.apply({"params": p}, ids[:, t:t + 1], pos, segment_ids=jnp.ones((2, 1), jnp.int32),
                                kv_segment_ids=kv_mask, cache=cache, cache_index=t)
        steps.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=1e-5, rtol=0)


def test_bf16_compute_with_fp32_params(setup):
    params, ids, ref = setup
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    logits, _ = llm.LLM(cfg).apply({"params": params}, ids)
    assert logits.dtype == jnp.float32 and jax.tree.leaves(params)[0].dtype == jnp.float32
    err = np.abs(np.asarray(logits) - ref).max()
    assert 0 < err < 0.1, err  # bf16 really is used, and stays close


def test_packed_segments_do_not_attend_across(setup):
    params, ids, _ = setup
    seg = np.array([[1] * 10 + [2] * 14] * 2, np.int32)
    pos = np.concatenate([np.arange(10), np.arange(14)])[None].repeat(2, 0).astype(np.int32)
    packed, _ = llm.LLM(CFG).apply({"params": params}, ids, pos, segment_ids=seg)
    first, _ = llm.LLM(CFG).apply({"params": params}, ids[:, :10])
    second, _ = llm.LLM(CFG).apply({"params": params}, ids[:, 10:])
    np.testing.assert_allclose(np.asarray(packed), np.concatenate([first, second], 1), atol=1e-5, rtol=0)


def test_bidirectional_span_lets_earlier_tokens_see_later_ones(setup):
    params, ids, ref = setup
    bidir = np.zeros_like(ids)
    bidir[:, 3:8] = 1
    out, _ = llm.LLM(CFG).apply({"params": params}, ids, bidirectional_ids=bidir)
    out = np.asarray(out)
    np.testing.assert_allclose(out[:, :3], ref[:, :3], atol=1e-6)  # before the span: unchanged
    assert np.abs(out[:, 3:7] - ref[:, 3:7]).max() > 1e-4  # inside: sees later span tokens


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LLMConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="remat_policy"):
        LLMConfig(remat_policy="some")
    with pytest.raises(ConfigError, match="unknown keys \\['hidden'\\]"):
        LLMConfig.from_json_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="hidden_act"):
        LLMConfig.from_hf_dict({"model_type": "llama", "hidden_act": "gelu"})
