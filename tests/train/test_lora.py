"""LoRA as a parameter-group mode (`mm.models.lora`, `mm.train.lora_groups`): the adapted model starts as the
base exactly, frozen kernels get no weight gradient and no optimizer state, adapters shard like their kernel,
checkpoints hold adapters only and resume exactly, and rules that cannot work are refused by name.
PEFT parity (import, export, merge) is `tests/convert/test_peft.py`."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

from helpers_train import tiny
from mm.config import ConfigError
from mm import lora_params
from mm.sharding import global_batch
from mm.train import loop, param_groups as pg
from mm.train.synthetic_source import SyntheticSource

LORA = {"lora": {"rank": 4, "alpha": 8}}
PROJ = r"layers_\d+/(self_attn|mlp)/.*"
# dims no activation has, so a dot producing a kernel's shape is a weight gradient (and nothing else)
WIDE = dict(vocab_size=96, hidden_size=40, intermediate_size=72, num_heads=4, num_kv_heads=2, head_dim=12)


def _cfg(groups, **llm):
    c = tiny("full")
    c.model.llm.update({**WIDE, **llm})
    c.param_groups = groups
    c.train.update(dict(batch_size=2, seq_len=28))  # 56 tokens: no kernel dim
    return c


def _batch(c, b, step=0):
    x = SyntheticSource(c).batch_at(step)
    x.pop("example_id")
    return global_batch(x, b.batch_sharding, 1)


def test_lora_run_starts_as_the_base_and_trains_only_adapters():
    c = _cfg([(PROJ, LORA), (".*", "frozen")])
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    base = loop.build(_cfg([("norm/.*", 1.0), (".*", "frozen")]), log=False, devices=jax.devices()[:1])
    flat = pg.flatten(pg.merge(b.state["params"], b.frozen))
    flat0 = pg.flatten(pg.merge(base.state["params"], base.frozen))
    assert set(lora_params.strip(flat)) == set(flat0)
    for k, v in flat0.items():  # the same random base as a run without LoRA
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)
    trainable = set(pg.flatten(b.state["params"]))
    n_adapted = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(trainable) == 2 * n_adapted and all(p.endswith(("/lora_a", "/lora_b")) for p in trainable)
    q = "layers_0/self_attn/q_proj/"
    assert flat[q + "lora_a"].shape == (40, 4) and flat[q + "lora_b"].shape == (4, 4, 12)
    assert flat["layers_1/self_attn/o_proj/lora_a"].shape == (4, 12, 4)  # o_proj contracts heads x head_dim
    assert float(flat[q + "lora_scale"]) == 8 / 4 and not np.any(np.asarray(flat[q + "lora_b"]))
    bound = 1 / np.sqrt(40)  # PEFT's kaiming-uniform (a = sqrt(5)) on A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = np.asarray(flat[q + "lora_a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound

    batch = jax.tree.map(lambda x: x[0], _batch(c, b))  # B = 0: the adapted model is the base, bit for bit
    l1 = b.model.loss(pg.merge(b.state["params"], b.frozen), batch)
    l0 = base.model.loss(pg.merge(base.state["params"], base.frozen), batch)
    assert float(l1[0]) == float(l0[0])

    state, m = b.step_fn(b.state, b.frozen, _batch(c, b))  # one step moves B only where gradients reach
    after = pg.flatten(state["params"])
    assert np.any(np.asarray(after[q + "lora_b"])) and np.isfinite(float(m["loss"]))


def test_rsLoRA_scale_and_lr_mult():
    c = _cfg([(r"layers_0/.*", {"lora": {"rank": 16, "alpha": 8, "rslora": True, "lr_mult": 0.5}}),
              (PROJ, LORA), (".*", "frozen")])
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    flat = pg.flatten(b.frozen)
    assert float(flat["layers_0/mlp/up_proj/lora_scale"]) == pytest.approx(8 / 4.0)  # alpha / sqrt(16)
    assert float(flat["layers_1/mlp/up_proj/lora_scale"]) == 2.0
    assert b.assignment.multiplier("layers_0/mlp/up_proj/lora_a") == 0.5
    assert b.assignment.multiplier("layers_1/mlp/up_proj/lora_b") == 1.0
    assert pg.flatten(b.state["params"])["layers_0/mlp/up_proj/lora_a"].shape == (40, 16)


def _dot_shapes(compiled) -> list[tuple[int, ...]]:
    out = []
    for m in re.finditer(r"= f32\[([\d,]*)\]\{[^}]*\} dot\(", compiled.as_text()):
        out.append(tuple(int(x) for x in m.group(1).split(",") if x))
    return out


def _kernel_shapes(flat, names):
    """Each adapted kernel's shape and its 2-D (in, out) form, as a weight-gradient dot would produce it."""
    shapes = set()
    for k in names:
        w = flat[k]
        shapes.add(tuple(w.shape))
        n_in = 2 if "o_proj" in k else 1
        shapes.add((int(np.prod(w.shape[:n_in])), int(np.prod(w.shape[n_in:]))))
        shapes.add((int(np.prod(w.shape[n_in:])), int(np.prod(w.shape[:n_in]))))
    return shapes


def test_frozen_kernels_get_no_weight_gradient_and_no_optimizer_state():
    full = _cfg([(".*", 1.0)])
    c = _cfg([(PROJ, LORA), (".*", "frozen")])
    got = {}
    for name, cfg in (("lora", c), ("full", full)):
        b = loop.build(cfg, log=False, devices=jax.devices()[:1])
        got[name] = (b, b.step_fn.lower(b.state, b.frozen, _batch(cfg, b)).compile())
    b, comp = got["lora"]
    flat = pg.flatten(pg.merge(b.state["params"], b.frozen))
    kernels = [k for k in flat if re.fullmatch(PROJ, k) and k.endswith("/kernel")]
    assert len(kernels) == 14
    weight_grads = _kernel_shapes(flat, kernels)
    # the check can fail: full fine-tuning computes these weight gradients
    assert weight_grads & set(_dot_shapes(got["full"][1]))
    assert not weight_grads & set(_dot_shapes(comp)), weight_grads & set(_dot_shapes(comp))
    # optimizer state: adam mu / nu of the adapters, nothing the size of a kernel
    opt = sorted(x.size for x in jax.tree.leaves(b.state["opt"]) if x.ndim)
    adapters = sorted(x.size for x in jax.tree.leaves(b.state["params"]))
    assert opt == sorted(adapters * 2)


def test_adapters_shard_like_their_kernel_with_the_rank_axis_unsharded():
    c = _cfg([(PROJ, LORA), (".*", "frozen")])
    c.mesh.update(dict(data=1, fsdp=4, tensor=2))
    c.train.batch_size = 4
    b = loop.build(c, log=False)
    flat = pg.flatten(pg.merge(b.state["params"], b.frozen))
    def spec(k):
        return tuple(flat[k].sharding.spec) + (None,) * (flat[k].ndim - len(flat[k].sharding.spec))
    q = "layers_0/self_attn/q_proj/"
    assert spec(q + "kernel") == ("fsdp", "tensor", None)
    assert spec(q + "lora_a") == ("fsdp", None) and spec(q + "lora_b") == (None, "tensor", None)
    o = "layers_0/self_attn/o_proj/"
    assert spec(o + "lora_a") == ("tensor", None, None) and spec(o + "lora_b") == (None, "fsdp")
    d = "layers_1/mlp/down_proj/"
    assert spec(d + "lora_a") == ("tensor", None) and spec(d + "lora_b") == (None, "fsdp")


@pytest.mark.parametrize("groups, match", [
    ([("lm_head/kernel", LORA), (".*", "frozen")], "no adapter can act on.*lm_head/kernel"),
    ([(PROJ, {"lora": {"rank": 4, "dropout": 0.1}}), (".*", "frozen")], r"lora\.dropout"),
    ([(PROJ, {"lora": {"rank": 0}}), (".*", "frozen")], r"lora\.rank"),
    ([(PROJ, {"lora": {"rank": 4, "alpah": 8}}), (".*", "frozen")], r"unknown keys \['alpah'\]"),
    ([("nothing/.*", LORA), (".*", "frozen")], "matches no kernel"),
])
def test_bad_lora_rules_are_refused_by_name(groups, match):
    from mm.train import schema as tcfg

    c = _cfg(groups)
    with pytest.raises(ConfigError, match=match):
        tcfg.validate(c, 1)
        loop.build(c, log=False, devices=jax.devices()[:1])


def test_lora_on_an_iaa_base_is_refused_and_its_insertion_layers_adapt():
    def iaa(groups):
        c = _cfg(groups)
        c.model.update(dict(kind="iaa", iaa_branches=["mm"], iaa_positions=[1]))
        c.data.update(dict(kind="synthetic_mm", num_image_tokens=4))
        c.model.vision_width = 16
        return c

    with pytest.raises(ConfigError, match="base layers run the text workflow"):
        loop.build(iaa([("base/" + PROJ, LORA), (".*", "frozen")]), log=False, devices=jax.devices()[:1])
    c = iaa([("mm/" + PROJ, LORA), ("mm/projector/.*", 1.0), (".*", "frozen")])
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    trainable = pg.flatten(b.state["params"])
    assert "mm/layers_0/self_attn/q_proj/lora_a" in trainable and not any(k.startswith("base/") for k in trainable)
    # the insertion layer was copied from the base, its adapter was not (the base has none)
    frozen = pg.flatten(b.frozen)
    np.testing.assert_array_equal(np.asarray(frozen["mm/layers_0/mlp/up_proj/kernel"]),
                                  np.asarray(frozen["base/layers_1/mlp/up_proj/kernel"]))
    x = jax.tree.map(lambda v: v[0], _batch(c, b))
    params = pg.merge(b.state["params"], b.frozen)
    stripped = pg.unflatten(lora_params.strip(pg.flatten(params)))
    for wf in ("mm", "text"):  # B = 0: both workflows equal the un-adapted model's
        assert float(b.model.eval_losses[wf](params, x)[0]) == float(b.model.eval_losses[wf](stripped, x)[0])


def test_checkpoint_holds_adapters_only_and_resume_is_exact(tmp_path):
    import orbax.checkpoint as ocp

    c = _cfg([(PROJ, LORA), (".*", "frozen")])
    c.train.steps = 4
    c.checkpoint.update(dict(every=2, keep=10, use_async=False))
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(c, full, devices=jax.devices()[:1])
    with ocp.StandardCheckpointer() as ck:
        saved = ck.restore(full / "checkpoints" / "2" / "state")
    paths = set(pg.flatten(saved["params"]))
    assert paths and all(p.endswith(("/lora_a", "/lora_b")) for p in paths)

    shutil.copytree(full, cut)  # as if preempted after step 2: step 4 and its metrics never happened
    shutil.rmtree(cut / "checkpoints" / "4")
    rows = [r for r in map(json.loads, (cut / "metrics.jsonl").read_text().splitlines()) if r.get("step", 0) <= 2]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loop.train(c, cut, devices=jax.devices()[:1])

    def losses(w):
        return {r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"}

    assert losses(cut) == losses(full) and sorted(losses(full)) == [1, 2, 3, 4]
    with ocp.StandardCheckpointer() as ck:
        a = ck.restore(full / "checkpoints" / "4" / "state")
        b = ck.restore(cut / "checkpoints" / "4" / "state")
    for k, v in pg.flatten(a["params"]).items():
        np.testing.assert_array_equal(v, pg.flatten(b["params"])[k], err_msg=k)


def test_vit_and_llava_llm_adapt_and_start_as_the_base():
    """LoRA on the ViT run in the step (`vlm`) and on a LLaVA-style model's LLM: adapters where the rules say,
    the step-0 loss that of the same run without adapters, bit for bit."""
    def vlm(groups):
        c = _cfg(groups)
        c.model.kind = "vlm"
        c.data.update(dict(kind="synthetic_mm", num_image_tokens=4))
        return c

    vit = r"vision/encoder/layers_\d+/(self_attn|mlp)/.*"
    groups = [(vit, LORA), ("llm/" + PROJ, LORA), ("projector/.*", 1.0), (".*", "frozen")]
    b = loop.build(vlm(groups), log=False, devices=jax.devices()[:1])
    b0 = loop.build(vlm([("projector/.*", 1.0), (".*", "frozen")]), log=False, devices=jax.devices()[:1])
    trainable = pg.flatten(b.state["params"])
    assert "vision/encoder/layers_0/self_attn/q_proj/lora_a" in trainable
    assert "vision/encoder/layers_0/mlp/fc1/lora_b" in trainable and "llm/layers_1/mlp/down_proj/lora_a" in trainable
    assert not any("patch" in k or "lm_head" in k for k in trainable if lora_params.is_adapter(k))
    x = jax.tree.map(lambda v: v[0], _batch(vlm(groups), b))
    l1 = b.model.loss(pg.merge(b.state["params"], b.frozen), x)[0]
    l0 = b0.model.loss(pg.merge(b0.state["params"], b0.frozen), x)[0]
    assert float(l1) == float(l0)


def test_aot_memory_of_lora_against_full_fine_tuning():
    """`mm.train.aot` compiles the step for 8 devices from shapes alone; LoRA's per-device arguments (frozen base
    + adapters + their Adam moments) are below full fine-tuning's (params + moments of everything) by at least
    half the moments it no longer holds (rank 1: in this tiny model adapters without an `embed` axis, B of q / k
    / v / gate / up, are replicated over FSDP and weigh about as much as the sharded base)."""
    from mm.profiling import compiled as compiled_lib
    from mm.train import aot

    got = {}
    rank1 = {"lora": {"rank": 1, "alpha": 1}}
    for name, groups in (("full", [(".*", 1.0)]), ("lora", [(PROJ, rank1), (".*", "frozen")])):
        c = _cfg(groups)
        c.mesh.update(dict(data=1, fsdp=8, tensor=1))
        c.train.batch_size = 8
        b, compiled = aot.compile_step(c, jax.devices()[:8])
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(b.state))  # nothing allocated
        got[name] = (compiled_lib.trainable_counts(b), compiled_lib.memory(compiled))
    (nf, mf), (nl, ml) = got["full"], got["lora"]
    # by hand: 2 layers x (q 40x48, k 40x24, v 40x24, o 48x40, gate 40x72, up 40x72, down 72x40) adapters of rank 1
    per_layer = ((40 + 48) + 2 * (40 + 24) + (48 + 40) + 2 * (40 + 72) + (72 + 40))
    assert nl["trainable"] == 2 * per_layer
    assert nf["frozen"] == 0 and nl["frozen"] == nf["trainable"] + 2 * 7  # the base, and one scale an adapter
    # f32 Adam moments: 8 bytes a trainable param (+ the step count)
    for n in (nf, nl):
        assert abs(n["optimizer_bytes"] - 8 * n["trainable"]) < 64, n
    saved = 8 * (nf["trainable"] - nl["trainable"]) / 8  # moments no longer held, per device (FSDP over 8)
    assert ml.arguments < mf.arguments - 0.5 * saved, (ml, mf)


def test_scanned_layers_adapt_and_count_the_same_flops():
    """With `scan_layers=True` the adapters are stacked like their kernels (`[L, in.., r]`); the step's analytic
    FLOPs equal the per-layer tree's (adapted stages pass gradients down)."""
    flops = {}
    for scan in (False, True):
        rule = r"layers/layer/(self_attn|mlp)/.*" if scan else PROJ
        c = _cfg([(rule, LORA), (".*", "frozen")], scan_layers=scan)
        b = loop.build(c, log=False, devices=jax.devices()[:1], abstract=True)
        flops[scan] = b.flops
        if scan:
            t = pg.flatten(b.state["params"])
            assert t["layers/layer/self_attn/q_proj/lora_a"].shape == (2, 40, 4)
            assert t["layers/layer/self_attn/o_proj/lora_b"].shape == (2, 4, 40)
    assert flops[True] == flops[False] and flops[True]["backward"] > 0, flops
