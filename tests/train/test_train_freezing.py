"""Parameter groups and freezing: unmatched params stop the run, frozen params get no optimizer state and
no backward pass in the compiled step (counted in the optimised HLO), analytic FLOPs match XLA's count."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from helpers_train import tiny
from mm.config import ConfigError
from mm.sharding import global_batch
from mm.train import flops as F
from mm.train import loop, param_groups as pg
from mm.train.synthetic_source import SyntheticSource


@pytest.fixture(scope="module")
def compiled():
    """Per variant: (built, compiled step, batch) on one device, wide enough for FLOPs to be matmul-dominated."""
    out = {}
    for variant in ("head", "last_layer", "full"):
        c = tiny(variant)
        c.model.llm.update(dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_heads=4,
                                num_kv_heads=2, head_dim=64))
        c.train.seq_len = 64
        b = loop.build(c, log=False, devices=jax.devices()[:1])
        x = SyntheticSource(c).batch_at(0)
        x.pop("example_id")
        batch = global_batch(x, b.batch_sharding, 1)
        out[variant] = (b, b.step_fn.lower(b.state, b.frozen, batch).compile(), batch)
    return out


def _dots(compiled) -> int:
    return len(re.findall(r"\bdot\(", compiled.as_text()))


def test_unmatched_params_are_named():
    paths = ["layers_0/mlp/up_proj/kernel", "norm/scale", "lm_head/kernel"]
    with pytest.raises(ConfigError, match="layers_0/mlp/up_proj/kernel") as e:
        pg.assign(paths, [("(norm|lm_head)/.*", 1.0)])
    assert "norm/scale" not in str(e.value)


def test_first_rule_wins_and_report_counts():
    paths = {"a/kernel": jnp.zeros((3, 4)), "a/bias": jnp.zeros(4), "b/kernel": jnp.zeros((2, 2))}
    asg = pg.assign(list(paths), [("a/bias", "frozen"), ("a/.*", 0.5), (".*", 1.0)])
    assert not asg.is_trainable("a/bias") and asg.multiplier("a/kernel") == 0.5
    rows = pg.group_report(paths, asg)
    assert [r["params"] for r in rows] == [4, 12, 4]
    text = pg.format_report(rows)
    assert "trainable params: 16" in text and "frozen params: 4" in text


def test_frozen_params_have_no_optimizer_state_and_no_backward(compiled):
    b_head, c_head, batch = compiled["head"]
    trainable_paths = set(pg.flatten(b_head.state["params"]))
    assert trainable_paths == {"norm/scale", "lm_head/kernel"}
    frozen_paths = set(pg.flatten(b_head.frozen))
    assert "layers_0/mlp/up_proj/kernel" in frozen_paths
    # optimizer state: only shapes of trainable leaves (mu/nu), nothing the size of a frozen matrix
    opt_sizes = sorted(x.size for x in jax.tree.leaves(b_head.state["opt"]) if x.ndim)
    assert opt_sizes == sorted([256, 256 * 512] * 2)

    # forward-only dot count, from the plain loss
    fwd = jax.jit(lambda p, bt: b_head.model.loss(p, jax.tree.map(lambda x: x[0], bt)))
    params = pg.merge(b_head.state["params"], b_head.frozen)
    n_fwd = _dots(fwd.lower(params, {k: v for k, v in batch.items() if k != "example_id"}).compile())
    assert n_fwd == 2 * 9 + 1  # per layer q,k,v,o,gate,up,down + 2 attention dots; lm head
    # every trainable-or-upstream dot gets exactly two backward dots; frozen layers below get none
    assert _dots(c_head) == n_fwd + 2
    assert _dots(compiled["last_layer"][1]) == n_fwd + 2 * (9 + 1)
    assert _dots(compiled["full"][1]) == 3 * n_fwd


@pytest.mark.parametrize("variant", ["full", "head", "last_layer"])
def test_analytic_flops_match_xla_cost_analysis(compiled, variant):
    b, comp, _ = compiled[variant]
    xla = F.xla_flops(comp)
    assert abs(xla / b.flops["total"] - 1) < 0.10, (xla, b.flops)
    # frozen parts are forward-only: for the head-only stage backward is the head's weight gradient alone
    if variant == "head":
        assert b.flops["backward"] == 2 * 256 * 512 * 8 * 64


def test_peak_table_and_mfu():
    assert F.peak_flops("TPU v5 lite") == 197e12 and F.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops("TPU v5p") == 459e12 and F.peak_flops("TPU v6e") == 918e12
    assert F.mfu(1e12, 1.0, 1, "cpu") is None
    assert F.mfu(197e12, 1.0, 1, "TPU v5 lite") == pytest.approx(1.0)


@functools.lru_cache(maxsize=None)
def _stage(spec):
    """(built, compiled step, batch) of a stage config at widths where FLOPs are matmul-dominated."""
    from mm.config import load_config_file

    c = load_config_file(spec)
    c.unlock()
    c.init.prng_impl = "unsafe_rbg"
    c.model.llm.update(dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                            head_dim=64))
    c.model.vision_width = 128
    c.train.seq_len = 64
    if "points" in spec:  # ViTs in the step: 8x8 patches (4x4 positions after the shuffle), per-layer freezing
        c.model.vision.update(dict(hidden_size=128, intermediate_size=512, image_size=112, patch_size=14))
        c.train.update(dict(seq_len=96, batch_size=4))
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    x = SyntheticSource(c).batch_at(0)
    x.pop("example_id")
    batch = global_batch(x, b.batch_sharding, 1)
    return b, b.step_fn.lower(b.state, b.frozen, batch).compile(), batch


# POINTS' ocr_vit and instruct compile two towers and the LLM for ~30 s each on 2 cores: heavy (CI's own step);
# pretrain (towers frozen and training side by side) stays in the default run, its compile shared with the dot
# count below
@pytest.mark.parametrize("spec", ["configs/llava.py:stage1", "configs/iaa.py:stage2",
                                  pytest.param("configs/points.py:ocr_vit", marks=pytest.mark.heavy),
                                  "configs/points.py:pretrain",
                                  pytest.param("configs/points.py:instruct", marks=pytest.mark.heavy)])
def test_multimodal_stage_flops_match_xla(spec):
    """Frozen LLM under a trainable projector still pays its input gradients; the count must know that. POINTS:
    both towers forward, backward only through the general ViT's last 3 layers in pretrain, none in instruct."""
    b, comp, _ = _stage(spec)
    xla = F.xla_flops(comp)
    assert abs(xla / b.flops["total"] - 1) < 0.10, (xla, b.flops)
    if "points" in spec:  # two towers forward, the frozen OCR one never backward
        assert b.flops["backward"] > 0
    else:
        assert b.flops["backward"] > b.flops["forward"]  # not forward-only although the LLM is frozen


def test_points_pretrain_has_no_weight_gradient_below_the_last_3_vit_layers():
    """The compiled `pretrain` step, dots counted by hand: the forward of both towers (patch embedding + 5 layers
    below the feature layer, 6 kernels + 2 attention dots each), the shared projector (2 Linears and the merge) and
    the LLM (2 layers x 9, head); backward: the LLM's input gradients only (7 kernels + 4 attention dots a layer,
    head) and the projector's (2 weight + 2 input gradients: the gradient goes on into the ViT), and 16 dots for
    each of the general ViT's 3 trained layers (6 weight, 6 input gradients - its layer norms train - and 4 for
    attention). A weight gradient of an earlier general-ViT layer, the OCR ViT or the LLM would add dots."""
    b, comp, batch = _stage("configs/points.py:pretrain")
    trained = {p.split("/")[2] for p in pg.flatten(b.state["params"]) if p.startswith("vision/")}
    assert trained == {"layers_2", "layers_3", "layers_4"}  # 6 layers, features from the 5th's output
    assert not any(p.startswith(("ocr_vision/", "llm/")) for p in pg.flatten(b.state["params"]))
    fwd = jax.jit(lambda p, bt: b.model.loss(p, jax.tree.map(lambda x: x[0], bt)))
    n_fwd = _dots(fwd.lower(pg.merge(b.state["params"], b.frozen), batch).compile())
    tower = 1 + 5 * (6 + 2)
    assert n_fwd == 2 * tower + 3 + 2 * 9 + 1
    assert _dots(comp) == n_fwd + (2 * (7 + 4) + 1) + 4 + 3 * 16


@pytest.mark.parametrize("variant", ["full", "head"])
def test_scanned_layers_count_the_same_flops(variant):
    """`scan_layers=True` stacks the layers into one `layers/layer/...` array; the analytic FLOPs (whose stages
    name per-layer params) equal the per-layer tree's, trainability included (they were once near zero)."""
    got = {}
    for scan in (False, True):
        c = tiny(variant)
        c.model.llm.scan_layers = scan
        got[scan] = loop.build(c, log=False, devices=jax.devices()[:1], abstract=True).flops
    assert got[True] == got[False] and got[True]["forward"] > 0, got
