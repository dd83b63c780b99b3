"""Checkpoint contents and restore onto another mesh; metrics files (JSONL, TensorBoard) and the progress line."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from helpers_train import tiny
from mm.train import loop, param_groups as pg


def test_checkpoint_holds_trainable_state_only_and_restores_onto_another_mesh(tmp_path, capsys):
    c = tiny("last_layer")
    c.train.steps = 2
    c.train.log_every = 1
    c.metrics.tensorboard = True
    w = tmp_path / "w"
    loop.train(c, w, devices=jax.devices()[:1])
    out = capsys.readouterr().out
    # progress line and start-up group report
    assert "step      2/2  loss" in out and "tok/s" in out and "MFU n/a" in out and "ETA" in out
    assert "trainable params:" in out and "frozen params:" in out
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "skipped"} <= set(rows[0])
    assert list((w / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((w / "config.json").read_text())["param_groups"][0][0] == "layers_1/.*"

    with ocp.StandardCheckpointer() as ck:
        saved = ck.restore(w / "checkpoints" / "2" / "state")
    paths = set(pg.flatten(saved["params"]))
    assert paths and all(p.startswith(("layers_1/", "norm/", "lm_head/")) for p in paths)  # frozen not written
    assert int(saved["step"]) == 2
    meta = json.loads((w / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["frozen_source"]["seed"] == c.init.seed

    # continue on an 8-device FSDP mesh: the state is restored onto the new shardings, training goes on
    c.train.steps = 3
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.metrics.tensorboard = False
    r = loop.train(c, w, devices=jax.devices())
    assert r.last_step == 3 and "resumed from" in capsys.readouterr().out
    b = loop.build(c, log=False)
    restored, _, _ = loop.Checkpointer(w, keep=3).restore(2, b.state)
    k = restored["params"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert len(k.sharding.device_set) == 8 and k.sharding.spec[0] == "fsdp"
    np.testing.assert_array_equal(np.asarray(k), saved["params"]["layers_1"]["mlp"]["up_proj"]["kernel"])


def test_optimizer_state_is_sharded_like_its_params():
    """FSDP shards Adam's moments as it shards the params (they were once replicated on every device)."""
    c = tiny("full")
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    b = loop.build(c, log=False)
    params = pg.flatten(b.state["params"])
    opt = pg.flatten(b.state["opt"])
    moments = {k: v for k, v in opt.items() if "/mu/" in k or "/nu/" in k}
    assert len(moments) == 2 * len(params)
    for k, v in moments.items():
        p = params[k.split("/mu/" if "/mu/" in k else "/nu/", 1)[1]]
        assert v.sharding.is_equivalent_to(p.sharding, v.ndim), k
    k = "layers_0/mlp/up_proj/kernel"
    assert len(params[k].sharding.device_set) == 8 and params[k].sharding.spec[0] == "fsdp"
    assert next(v for n, v in moments.items() if n.endswith(k)).addressable_shards[0].data.shape[0] == 32 // 8
