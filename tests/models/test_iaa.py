"""IAA: the text workflow is the LLM bit for bit; branches follow DESIGN.md's hidden-state flow."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm.config import ConfigError, LLMConfig
from mm.generate import Generator
from mm.models import iaa, llm
from mm.config import ProjectorConfig

LLM_CFG = LLMConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                    head_dim=8)
VIS = 12
PROJ = ProjectorConfig(kind="mlp2x_gelu", in_dim=VIS, out_dim=32)
CFG = iaa.IAAConfig(llm=LLM_CFG, branches=(iaa.BranchConfig("mm", (0, 2, 3), PROJ), iaa.BranchConfig("g", (1,), PROJ)))


@pytest.fixture(scope="module")
def params():
    base = llm.init_params(LLM_CFG, jax.random.PRNGKey(0))
    p = iaa.init_params(CFG, base, jax.random.PRNGKey(1))
    # Perturb the branches so a mix-up between base and branch parts cannot go unnoticed.
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 1000))
    for b in ("mm", "g"):
        p[b] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), p[b])
    return p


def test_text_workflow_is_bit_identical_to_the_llm(params):
    ids = np.random.RandomState(0).randint(0, 80, (3, 37)).astype(np.int32)
    plain = jax.jit(lambda p, x: llm.LLM(LLM_CFG).apply({"params": p}, x)[0])(params["base"], ids)
    text = jax.jit(lambda p, x: iaa.IAA(CFG).apply({"params": p}, x, workflow="text")[0])(params, ids)
    assert np.array_equal(np.asarray(plain), np.asarray(text))
    assert params["base"] is not params["mm"]


def test_branch_init_copies_the_base(params):
    base = params["base"]
    fresh = iaa.init_branch_from_base(CFG, "mm", base, jax.random.PRNGKey(5))
    for k, pos in enumerate((0, 2, 3)):
        for a, b in zip(jax.tree.leaves(fresh[f"layers_{k}"]), jax.tree.leaves(base[f"layers_{pos}"])):
            assert np.array_equal(a, b)
            assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # its own buffer: training can't alias
    assert np.array_equal(fresh["embed_tokens"]["embedding"], base["embed_tokens"]["embedding"])
    assert np.array_equal(fresh["lm_head"]["kernel"], base["lm_head"]["kernel"])
    assert set(fresh) == {"projector", "embed_tokens", "norm", "lm_head", "layers_0", "layers_1", "layers_2"}


def _manual_branch_forward(p, branch, positions, ids, feats, mask):
    """Reference: DESIGN.md's flow written out with the plain decoder layer, one layer at a time."""
    from mm.models.connectors import Projector
    from mm.models.splice import splice_image_features

    bp, c = p[branch], LLM_CFG
    x = jnp.take(bp["embed_tokens"]["embedding"], ids, axis=0)
    x = splice_image_features(x, Projector(PROJ).apply({"params": bp["projector"]}, feats), mask)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    cos, sin = llm.rope_cos_sin(pos, llm.rope_inv_freq(c.head_dim, c.rope_theta, None), jnp.float32)
    layer = llm.DecoderLayer(c)
    order = []
    for i in range(c.num_layers):
        x, _ = layer.apply({"params": p["base"][f"layers_{i}"]}, x, cos, sin, {})
        order.append(f"L{i}")
        if i in positions:
            k = positions.index(i)
            x, _ = layer.apply({"params": bp[f"layers_{k}"]}, x, cos, sin, {})
            order.append(f"C{k}")
    x = llm.RMSNorm(c.hidden_size, c.rms_norm_eps).apply({"params": bp["norm"]}, x)
    return x @ bp["lm_head"]["kernel"], order


@pytest.mark.parametrize("branch,positions", [("mm", (0, 2, 3)), ("g", (1,))])
def test_branch_follows_the_insertion_order(params, branch, positions):
    rs = np.random.RandomState(1)
    ids = rs.randint(0, 80, (2, 20)).astype(np.int32)
    mask = np.zeros((2, 20), bool)
    mask[0, 2:6] = True  # row 0: one image of 4 tokens; row 1: text only
    feats = rs.randn(2, 4, VIS).astype(np.float32)
    out, _ = iaa.IAA(CFG).apply({"params": params}, ids, workflow=branch, image_features=feats, image_mask=mask)
    ref, order = _manual_branch_forward(params, branch, list(positions), ids, feats, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    if branch == "mm":
        assert order == ["L0", "C0", "L1", "L2", "C1", "L3", "C2"]


def test_mixed_batch_rows_are_independent(params):
    rs = np.random.RandomState(2)
    ids = rs.randint(0, 80, (3, 24)).astype(np.int32)
    mask = np.zeros((3, 24), bool)
    mask[0, 1:4] = True
    mask[0, 10:13] = True  # two images in row 0
    mask[2, 5:8] = True  # one image in row 2; row 1 is text only
    feats = np.zeros((3, 6, VIS), np.float32)
    feats[0] = rs.randn(6, VIS)
    feats[2, :3] = rs.randn(3, VIS)
    model = iaa.IAA(CFG)
    both, _ = model.apply({"params": params}, ids, workflow="mm", image_features=feats, image_mask=mask)
    for r in range(3):
        single, _ = model.apply({"params": params}, ids[r:r + 1], workflow="mm", image_features=feats[r:r + 1],
                                image_mask=mask[r:r + 1])
        np.testing.assert_allclose(np.asarray(both[r]), np.asarray(single[0]), atol=1e-5, rtol=0)


def test_bidirectional_image_attention_switch(params):
    rs = np.random.RandomState(3)
    ids = rs.randint(0, 80, (1, 16)).astype(np.int32)
    mask = np.zeros((1, 16), bool)
    mask[0, 3:7] = True
    feats = rs.randn(1, 4, VIS).astype(np.float32)
    causal, _ = iaa.IAA(CFG).apply({"params": params}, ids, workflow="mm", image_features=feats, image_mask=mask)
    bidir_cfg = dataclasses.replace(CFG, bidirectional_image_attention=True)
    bidir, _ = iaa.IAA(bidir_cfg).apply({"params": params}, ids, workflow="mm", image_features=feats,
                                        image_mask=mask)
    np.testing.assert_allclose(np.asarray(causal[0, :3]), np.asarray(bidir[0, :3]), atol=1e-6)
    assert np.abs(np.asarray(causal[0, 3:6]) - np.asarray(bidir[0, 3:6])).max() > 1e-4


@pytest.mark.parametrize("workflow,bidir", [("text", False), ("mm", False), ("mm", True)])
def test_cached_generation_per_workflow(params, workflow, bidir):
    """With bidirectional image attention too: the prefill's image tokens see each other in the cache."""
    cfg = dataclasses.replace(CFG, bidirectional_image_attention=bidir)
    rs = np.random.RandomState(4)
    prompts = [rs.randint(0, 80, 9).tolist(), rs.randint(0, 80, 5).tolist()]
    masks = [np.array([0, 1, 1, 1, 0, 0, 0, 0, 0], bool), np.zeros(5, bool)]
    feats = np.zeros((2, 3, VIS), np.float32)
    feats[0] = rs.randn(3, VIS)
    extra = {} if workflow == "text" else {"image_features": feats, "image_mask": masks}
    gen = Generator(iaa.decode_fns(cfg, workflow))
    out, _ = gen(params, prompts, max_new_tokens=5, extra=extra)
    # Plain definition: argmax of the uncached forward over the whole sequence. Causal attention makes the
    # zero padding after the sequence irrelevant, so one fixed length (one compile) serves every step.
    fwd = jax.jit(lambda p, x, f, m: iaa.IAA(cfg).apply(
        {"params": p}, x, workflow=workflow, **({} if workflow == "text" else dict(image_features=f, image_mask=m)))[0])
    for r, prompt in enumerate(prompts):
        seq = list(prompt)
        m = np.zeros((1, 16), bool)
        m[0, :len(prompt)] = masks[r]
        for _ in range(5):
            x = np.zeros((1, 16), np.int32)
            x[0, :len(seq)] = seq
            seq.append(int(jnp.argmax(fwd(params, x, feats[r:r + 1], m)[0, len(seq) - 1])))
        assert seq[len(prompt):] == out[r].tolist()


def test_workflow_caches_differ_in_structure():
    text = iaa.init_cache(CFG, "text", 1, 8)
    mm_cache = iaa.init_cache(CFG, "mm", 1, 8)
    assert len(text) == 4 and len(mm_cache["base"]) == 4 and len(mm_cache["branch"]) == 3


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="positions"):
        iaa.IAAConfig(llm=LLM_CFG, branches=(iaa.BranchConfig("mm", (0, 9), PROJ),))
    with pytest.raises(ConfigError, match="unique"):
        iaa.IAAConfig(llm=LLM_CFG, branches=(iaa.BranchConfig("mm", (0,), PROJ), iaa.BranchConfig("mm", (1,), PROJ)))
    with pytest.raises(ConfigError, match="out_dim"):
        iaa.IAAConfig(llm=LLM_CFG, branches=(iaa.BranchConfig("mm", (0,), dataclasses.replace(PROJ, out_dim=8)),))


def test_every_new_parameter_has_logical_names():
    abstract = iaa.abstract_params(CFG)
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxes)
    assert set(abstract) == {"base", "mm", "g"}


@pytest.mark.parametrize("preset,expected", [("iaa14", 4.13e9), ("iaa8", 2.82e9)])
def test_llama3_8b_branch_sizes_from_shapes_only(preset, expected):
    llama3 = LLMConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=500000.0)
    cfg = iaa.preset(preset, llama3, vision_width=1024, branches=("mm",))
    counts = iaa.trainable_counts(cfg)
    assert abs(counts["mm"] - expected) / expected < 0.01, counts
    assert abs(counts["base"] - 8.03e9) / 8.03e9 < 0.01, counts
