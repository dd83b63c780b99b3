"""The optimiser and the step: per-group multipliers, decay mask, schedule, accumulation, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_train import tiny
from mm.sharding import global_batch
from mm.train import loop, param_groups as pg
from mm.train.synthetic_source import SyntheticSource
from mm.train.optimizer import make_optimizer, schedule

ONE = None


def _one():
    return jax.devices()[:1]


def test_group_multiplier_scales_the_adamw_update_and_decay_skips_norms():
    c = tiny()
    c.optim.update(dict(lr=0.1, weight_decay=0.5, clip_norm=0.0, warmup_frac=0.0))
    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((2, 3))}, "n": {"scale": jnp.ones(3)}}
    asg = pg.assign(list(pg.flatten(params)), [("a/.*", 1.0), ("b/.*", 0.25), (".*", 1.0)])
    opt = make_optimizer(c, params, asg)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    upd, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(upd["b"]["kernel"], 0.25 * upd["a"]["kernel"], rtol=1e-6)
    # Adam's first step is lr * sign(g); decoupled decay adds lr * wd * p on matrices only
    np.testing.assert_allclose(upd["a"]["kernel"], -0.1 * (1 + 0.5), rtol=1e-5)
    np.testing.assert_allclose(upd["n"]["scale"], -0.1, rtol=1e-5)


def test_schedule_warmup_three_percent_then_cosine():
    c = tiny()
    c.train.steps = 200
    c.optim.update(dict(lr=1.0, min_lr_ratio=0.1))
    f = schedule(c)
    assert float(f(0)) == 0.0 and float(f(6)) == pytest.approx(1.0)
    assert float(f(3)) == pytest.approx(0.5)
    assert float(f(200)) == pytest.approx(0.1)
    assert float(f(103)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-3)


def _run_steps(c, n):
    b = loop.build(c, log=False, devices=_one())
    src = SyntheticSource(c)
    state, out = b.state, []
    for _ in range(n):
        x = next(src)
        x.pop("example_id")
        state, m = b.step_fn(state, b.frozen, global_batch(x, b.batch_sharding, 1))
        out.append(jax.device_get(m))
    return state, out


def test_gradient_accumulation_matches_one_big_batch():
    c1 = tiny("last_layer")
    c2 = tiny("last_layer")
    c2.optim.grad_accum = 4
    s1, m1 = _run_steps(c1, 2)
    s2, m2 = _run_steps(c2, 2)
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for x, y in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    c = tiny("head")
    c.data.nan_at_steps = [1]
    b = loop.build(c, log=False, devices=_one())
    src = SyntheticSource(c)
    state = b.state
    before = None
    for i in range(3):
        x = next(src)
        x.pop("example_id")
        if i == 1:
            before = jax.device_get(state["params"])
        state, m = b.step_fn(state, b.frozen, global_batch(x, b.batch_sharding, 1))
        m = jax.device_get(m)
        assert bool(m["finite"]) == (i != 1)
        if i == 1:
            after = jax.device_get(state["params"])
            for p, q in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                np.testing.assert_array_equal(p, q)
    assert int(state["skipped"]) == 1 and int(state["step"]) == 3


def test_consecutive_non_finite_steps_stop_the_run_naming_step_and_ids(tmp_path):
    c = tiny("head")
    c.data.nan_at_steps = [2, 3, 4]
    c.train.max_consecutive_nonfinite = 3
    with pytest.raises(loop.NonFiniteError, match=r"last at step 5.*step 3: \[16, 17"):
        loop.train(c, tmp_path / "w", devices=_one())


def test_chunked_cross_entropy_loss_matches_materialised_logits():
    c1, c2 = tiny("last_layer"), tiny("last_layer")
    c2.train.loss_chunk = 24  # does not divide the 8 * 16 tokens: padding path too
    _, m1 = _run_steps(c1, 2)
    _, m2 = _run_steps(c2, 2)
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("spec", ["configs/llava.py:stage2", "configs/iaa.py:stage2"])
def test_chunked_loss_for_multimodal_heads_matches_materialised_logits(spec):
    """LLaVA's LLM head and an IAA branch's MM-LH go through the chunked loss too (IAA's text eval as well)."""
    from mm.config import load_config_file

    runs = []
    for chunk in (0, 24):
        c = load_config_file(spec)
        c.unlock()
        c.init.prng_impl = "unsafe_rbg"
        c.train.loss_chunk = chunk
        b = loop.build(c, log=False, devices=_one())
        x = SyntheticSource(c).batch_at(0)
        x.pop("example_id")
        state, m = b.step_fn(b.state, b.frozen, global_batch(x, b.batch_sharding, 1))
        runs.append(jax.device_get(m))
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-5)
    assert runs[0]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-4)
