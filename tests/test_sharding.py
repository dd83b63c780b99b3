"""Meshes from config, the logical-axis rules, and sharded forwards on 8 simulated CPU devices."""

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mm import sharding as sh
from mm.config import ConfigError, LLMConfig, load_config_file
from mm.models import llm

CFG = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, model_type="qwen2", attention_bias=True)

REPO = Path(__file__).resolve().parents[1]


def _layout(name):
    """(mesh shape, rule overrides) from configs/sharding.py, plus one extra all-axes layout."""
    if name == "all_three":
        return (2, 2, 2), None
    cfg = load_config_file(f"{REPO}/configs/sharding.py:{name}")
    return dict(cfg.mesh), dict(cfg.rules)


MESHES = ["dp", "fsdp", "fsdp_tp", "all_three"]


def test_mesh_shape_resolution():
    assert sh.mesh_shape_from_config({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    assert sh.mesh_shape_from_config((1, -1, 4), 8) == (1, 2, 4)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sh.mesh_shape_from_config((2, 3, 1), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        sh.mesh_shape_from_config((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sh.mesh_shape_from_config({"model": 2}, 8)
    with pytest.raises(ValueError, match="do not divide"):
        sh.mesh_shape_from_config((3, -1, 1), 8)


def test_rule_overrides_reject_unknown_axes():
    assert dict(sh.rules_from_overrides({"embed": None}))["embed"] is None
    with pytest.raises(ValueError, match="unknown logical axes"):
        sh.rules_from_overrides({"embedding": None})


def test_every_param_and_activation_has_logical_names():
    abstract = llm.abstract_params(CFG)
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    known = set(sh.LOGICAL_AXES)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def _expected_spec(names, rules):
    table = dict(rules)
    return PartitionSpec(*[table[n] for n in names])


def _strip(spec):
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(tuple(p) if isinstance(p, list) else p for p in parts)


@pytest.fixture(scope="module")
def reference():
    params = llm.init_params(CFG, jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 40)).astype(np.int32)
    logits, _ = jax.jit(lambda p, x: llm.LLM(CFG).apply({"params": p}, x))(params, ids)
    return params, ids, np.asarray(logits)


def test_layout_configs_are_checked():
    with pytest.raises(ValueError, match="unknown layout"):
        load_config_file(f"{REPO}/configs/sharding.py:zero3")
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(f"{REPO}/configs/nope.py")
    cfg = load_config_file(f"{REPO}/configs/sharding.py:fsdp")
    with pytest.raises(AttributeError):
        cfg.mesh.dat = 2  # locked: a misspelt key is an error


@pytest.mark.parametrize("name", MESHES)
def test_sharded_forward_matches_single_device(name, reference):
    assert jax.device_count() == 8
    params, ids, ref = reference
    shape, overrides = _layout(name)
    rules = sh.rules_from_overrides(overrides)
    mesh = sh.make_mesh(shape)
    abstract = llm.abstract_params(CFG)
    pshard = sh.param_shardings(abstract, mesh, rules)
    fwd = sh.sharded_jit(
        lambda p, x: llm.LLM(CFG).apply({"params": p}, x)[0], mesh, rules,
        in_shardings=(pshard, sh.batch_sharding(mesh, rules=rules)),
        out_shardings=sh.logical_sharding(mesh, ("act_batch", "act_length", "act_vocab"), rules))
    placed = jax.device_put(params, pshard)
    out = fwd(placed, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=0)

    # Every parameter is laid out exactly as the rules table says.
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    arrays = jax.tree.leaves(placed)
    assert len(boxed) == len(arrays)
    for box, arr in zip(boxed, arrays):
        assert _strip(arr.sharding.spec) == _strip(_expected_spec(box.names, rules)), box.names
    # The activation constraints made it into the program (they silently vanish without a mesh in context).
    assert fwd.lower(placed, ids).as_text().count("sharding_constraint") > 0
    if name == "fsdp_tp":
        q = placed["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec[:2] == ("fsdp", "tensor")
        assert q.addressable_shards[0].data.shape == (64 // 4, 4 // 2, 16)


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # a one-task allocation: one process
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # one TPU VM (and what mm-aot sets on a CPU host)
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu-pod"),
])
def test_cluster_environments_start_jax_distributed_with_nothing_passed(monkeypatch, env, want):
    """On SLURM steps of several tasks and multi-host TPU pods `mm-train` needs no coordinator flags: it calls
    `jax.distributed.initialize()` bare and jax's cluster detection fills them; elsewhere a single process
    initialises nothing."""
    import mm.sharding as sh

    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    assert sh.cluster_environment() == want
    sh.initialize_distributed(None, 1, 0)
    assert calls == ([] if want is None else [dict(coordinator_address=None, num_processes=None, process_id=None,
                                                   local_device_ids=None)])
    calls.clear()
    sh.initialize_distributed("10.0.0.1:1234", 2, 1)  # explicit flags win everywhere
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1, local_device_ids=None)]
