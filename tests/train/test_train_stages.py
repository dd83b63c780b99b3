"""Stage configs chain: each stage starts from the previous one's trained params; frozen parts stay put
(for IAA the text workflow's held-out loss is exactly the base LLM's, at every evaluation and every stage)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mm.config import load_config_file
from mm.models import llm as llm_lib
from mm.train import loop, param_groups as pg
from mm.train.schema import llm_config_from
from mm.train.synthetic_source import SyntheticSource
from mm.losses import cross_entropy


def _cfg(spec, **over):
    c = load_config_file(spec)
    c.unlock()
    c.init.prng_impl = "unsafe_rbg"
    c.train.steps = 3
    c.checkpoint.every = 0
    c.metrics.tensorboard = False
    for k, v in over.items():
        sec, key = k.split(".")
        c[sec][key] = v
    return c


def _evals(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["loss"]) for r in rows if r["kind"].startswith("eval_")]


def _saved_params(workdir, step):
    with ocp.StandardCheckpointer() as ck:
        return pg.flatten(ck.restore(workdir / "checkpoints" / str(step) / "state")["params"])


def test_iaa_stage_chain_and_frozen_text_workflow(tmp_path, capsys):
    d1, d2 = tmp_path / "s1", tmp_path / "s2"
    one = jax.devices()[:1]
    c1 = _cfg("configs/iaa.py:stage1", **{"train.eval_every": 3})
    loop.train(c1, d1, devices=one)
    loop.train(_cfg("configs/iaa.py:stage2", **{"init.checkpoint": str(d1), "train.eval_every": 3}), d2, devices=one)
    b_instruct = loop.build(_cfg("configs/iaa.py:instruct", **{"init.checkpoint": str(d2)}), log=False, devices=one)
    b3 = loop.build(_cfg("configs/iaa.py:grounding", **{"init.checkpoint": str(d2)}), log=False, devices=one)

    s1, s2 = _saved_params(d1, 3), _saved_params(d2, 3)
    # instruction tuning continues the whole mm branch stage 2 pre-trained
    start = pg.flatten(b_instruct.state["params"])
    assert set(start) == set(s2)
    for k, v in s2.items():
        np.testing.assert_array_equal(start[k], v)
    assert set(s1) == {f"mm/projector/linear_{k}/{n}" for k in (0, 1) for n in ("kernel", "bias")}
    assert "mm/layers_0/mlp/up_proj/kernel" in s2 and not any(p.startswith("base/") for p in s2)
    # stage 2 trained the projector further (its start from stage 1 is checked in the LLaVA test below)
    assert not np.array_equal(s2["mm/projector/linear_0/kernel"], s1["mm/projector/linear_0/kernel"])
    assert "init: 4 params from previous stage" in capsys.readouterr().out
    # grounding: the trained mm branch is loaded and frozen, g trains
    frozen3 = pg.flatten(b3.frozen)
    q = "mm/layers_1/self_attn/q_proj/kernel"
    np.testing.assert_array_equal(frozen3[q], s2[q])
    assert set(pg.flatten(b3.state["params"])) == {p for p in pg.flatten(b3.frozen) | pg.flatten(b3.state["params"])
                                                 if p.startswith("g/")}

    # the text workflow's held-out loss is the base LLM's own, exactly, at every evaluation of every stage
    texts = [v for k, v in _evals(d1) + _evals(d2) if k == "eval_text"]
    assert len(texts) == 2 and texts[0] == texts[1]
    base = {p[len("base/"):]: v for p, v in frozen3.items() if p.startswith("base/")}
    lc = llm_config_from(c1)
    src = SyntheticSource(c1, seed=int(c1.data.eval_seed), multimodal=False)
    s = n = 0.0
    for i in range(int(c1.train.eval_batches)):
        x = src.batch_at(i)
        logits, _ = llm_lib.LLM(lc).apply({"params": pg.unflatten(base)}, jnp.asarray(x["input_ids"][0]),
                                           jnp.asarray(x["positions"][0]), segment_ids=jnp.asarray(x["segment_ids"][0]))
        bs, bn = cross_entropy(logits, jnp.asarray(x["labels"][0]), jnp.asarray(x["loss_mask"][0]))
        s, n = s + float(bs), n + float(bn)
    assert texts[0] == pytest.approx(s / n, rel=1e-6)


def test_llava_stage1_then_stage2(tmp_path):
    one = jax.devices()[:1]
    d1 = tmp_path / "s1"
    loop.train(_cfg("configs/llava.py:stage1"), d1, devices=one)
    s1 = _saved_params(d1, 3)
    assert set(s1) == {f"projector/linear_{k}/{n}" for k in (0, 1) for n in ("kernel", "bias")}
    b2 = loop.build(_cfg("configs/llava.py:stage2", **{"init.checkpoint": str(d1)}), log=False, devices=one)
    start = pg.flatten(b2.state["params"])
    assert "llm/layers_0/mlp/up_proj/kernel" in start  # stage 2 trains the LLM too
    np.testing.assert_array_equal(start["projector/linear_1/kernel"], s1["projector/linear_1/kernel"])


def _vit_layer(c, i):  # one CLIP encoder layer: q, k, v, out (with biases), fc1, fc2, two layer norms
    return 4 * (c * c + c) + (c * i + i) + (i * c + c) + 2 * 2 * c


def _llama(v, d, f, n, heads, kv, hd):  # embedding, n layers (q, k, v, o, gate, up, down, 2 norms), norm, head
    return v * d + n * (d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * f + 2 * d) + d + d * v


@pytest.mark.heavy  # three stages trained end to end and an export: ~1-2 min on 2 cores
def test_points_stage_chain_trains_what_the_recipe_says(tmp_path, capsys):
    """ocr_vit -> pretrain -> instruct on the tiny preset: trainable params counted by hand per stage; pretrain's
    OCR ViT is ocr_vit's trained ViT, and instruct gets it back from ocr_vit through pretrain (which froze it);
    pretrain exported (`export-run`) loads as a two-tower VLMHandle with the trained weights."""
    one = jax.devices()[:1]
    d1, d2 = tmp_path / "ocr_vit", tmp_path / "pretrain"
    c1 = _cfg("configs/points.py:ocr_vit")
    b1 = loop.build(c1, log=False, devices=one)
    # tiny ViT: width 32, MLP 64, 28x28 images of 7x7 patches (16 + class token), 6 layers, features from the 5th's
    # output; projector 4 * 32 -> 64 -> 64 (pixel shuffle); LLM: vocab 256, d 64, FFN 128, 2 layers, 4 / 2 heads of 16
    emb = 3 * 7 * 7 * 32 + 32 + 17 * 32 + 2 * 32  # patch conv (no bias), class, positions, pre-layernorm
    proj = (128 * 64 + 64) + (64 * 64 + 64)
    count = lambda b: sum(x.size for x in pg.flatten(b.state["params"]).values())  # noqa: E731
    assert count(b1) == emb + 5 * _vit_layer(32, 64) + proj
    loop.train(c1, d1, devices=one)
    s1 = _saved_params(d1, 3)

    c2 = _cfg("configs/points.py:pretrain", **{"init.checkpoint": str(d1)})
    b2 = loop.build(c2, log=False, devices=one)
    assert count(b2) == 3 * _vit_layer(32, 64) + proj
    assert {p.split("/")[2] for p in pg.flatten(b2.state["params"]) if p.startswith("vision/")} == {
        "layers_2", "layers_3", "layers_4"}
    frozen2 = pg.flatten(b2.frozen)
    q = "encoder/layers_1/self_attn/q_proj/kernel"
    np.testing.assert_array_equal(frozen2[f"ocr_vision/{q}"], s1[f"vision/{q}"])  # renamed: vision -> ocr_vision
    assert not np.array_equal(frozen2[f"vision/{q}"], s1[f"vision/{q}"])  # the general ViT starts afresh
    np.testing.assert_array_equal(pg.flatten(b2.state["params"])["projector/linear_0/kernel"],
                                  s1["projector/linear_0/kernel"])
    loop.train(c2, d2, devices=one)
    s2 = _saved_params(d2, 3)

    # export-run: the two-tower model as an mm dir that mm.from_pretrained loads as a VLMHandle
    import mm
    from mm.train.export import export_run

    h = mm.from_pretrained(export_run(d2, tmp_path / "exported"))
    assert h.config.ocr_vision is not None and h.config.pixel_shuffle and h.config.tiling == "catty"
    assert h.config.lm.projector.merge == (0.5, 0.5)
    exported = pg.flatten(jax.device_get(h.params))
    np.testing.assert_array_equal(exported[f"ocr_vision/{q}"], s1[f"vision/{q}"])
    np.testing.assert_array_equal(exported["vision/encoder/layers_3/mlp/fc1/kernel"],
                                  s2["vision/encoder/layers_3/mlp/fc1/kernel"])

    b3 = loop.build(_cfg("configs/points.py:instruct", **{"init.checkpoint": str(d2)}), log=False, devices=one)
    assert count(b3) == proj + _llama(256, 64, 128, 2, 4, 2, 16)
    frozen3, start3 = pg.flatten(b3.frozen), pg.flatten(b3.state["params"])
    assert not any(p.startswith(("vision/", "ocr_vision/")) for p in start3)
    np.testing.assert_array_equal(frozen3[f"ocr_vision/{q}"], s1[f"vision/{q}"])  # ocr_vit's, through pretrain
    k = "vision/encoder/layers_3/mlp/fc1/kernel"
    np.testing.assert_array_equal(frozen3[k], s2[k])
    np.testing.assert_array_equal(start3["projector/linear_1/kernel"], s2["projector/linear_1/kernel"])
    out = capsys.readouterr().out
    assert "params from previous stage" in out and "params from earlier stage" in out
