"""A run's starting params come from the checkpoints it names: IAA branches are copies of the *loaded* LLM.

The reference tensors are the HF model's own (read by transformers / safetensors, laid out by hand here), so
a branch that copied the random init before the checkpoint arrived - the bug this guards - fails at once.
Stage 1 (projector) -> stage 2 (whole `mm` branch) -> grounding (`g` branch, `mm` frozen) on a real HF Llama
directory; stage 2 takes the base from stage 1's recorded frozen source; the stage-2 build runs on a
4 x 2 (fsdp x tensor) mesh so the checkpoint is read straight into sharded arrays.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from mm.train import loop, param_groups as pg
from mm.train.schema import base_config
from mm.train.from_checkpoints import llm_section
from tests.helpers.hf_models import make_llama

POSITIONS = [0, 2, 3]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("hf"), "gqa", num_hidden_layers=4)


def _hf_as_mm(hf_dir) -> dict[str, np.ndarray]:
    """The HF tensors under mm's param names, laid out by hand: Linear `[out, in]` -> kernel `[in, out]`,
    attention projections split into heads."""
    import json

    cfg = json.loads((hf_dir / "config.json").read_text())
    h, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = d // h
    t = {k: v.astype(np.float32) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    out = {"embed_tokens/embedding": t["model.embed_tokens.weight"], "norm/scale": t["model.norm.weight"],
           "lm_head/kernel": t["lm_head.weight"].T}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"layers_{i}/", f"model.layers.{i}."
        out[p + "self_attn/q_proj/kernel"] = t[q + "self_attn.q_proj.weight"].T.reshape(d, h, hd)
        out[p + "self_attn/k_proj/kernel"] = t[q + "self_attn.k_proj.weight"].T.reshape(d, kv, hd)
        out[p + "self_attn/v_proj/kernel"] = t[q + "self_attn.v_proj.weight"].T.reshape(d, kv, hd)
        out[p + "self_attn/o_proj/kernel"] = t[q + "self_attn.o_proj.weight"].T.reshape(h, hd, d)
        for m in ("gate_proj", "up_proj", "down_proj"):
            out[p + f"mlp/{m}/kernel"] = t[q + f"mlp.{m}.weight"].T
        out[p + "input_layernorm/scale"] = t[q + "input_layernorm.weight"]
        out[p + "post_attention_layernorm/scale"] = t[q + "post_attention_layernorm.weight"]
    return out


def _cfg(hf_dir, stage: str, **init):
    c = base_config()
    c.model.kind = "iaa"
    c.model.llm.update(llm_section(hf_dir))
    c.model.iaa_positions = POSITIONS
    c.data.kind = "synthetic_mm"
    c.init.prng_impl = "unsafe_rbg"
    c.init.seed = 7
    c.train.update(dict(steps=2, batch_size=8, seq_len=16, log_every=1))
    c.checkpoint.update(dict(every=0, use_async=False))
    c.metrics.tensorboard = False
    c.optim.lr = 1e-2  # large enough that two steps move every trained tensor visibly
    if stage == "stage1":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/projector/.*", 1.0), ("(base|mm)/.*", "frozen")]
    elif stage == "stage2":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/.*", 1.0), ("base/.*", "frozen")]
    else:
        c.model.iaa_branches = ["mm", "g"]
        c.model.iaa_workflow = "g"
        c.param_groups = [("g/.*", 1.0), ("(base|mm)/.*", "frozen")]
    c.init.update(init)
    return c


def _params(b) -> dict[str, np.ndarray]:
    from mm.train.step import merge

    return {k: np.asarray(v, np.float32) for k, v in pg.flatten(merge(b.state["params"], b.frozen)).items()}


def _copies_of_base(branch: str, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What DESIGN.md section 2 says a fresh branch starts as: MM-EL, norm, MM-LH copies of the LLM's; insertion
    layer k a copy of LLM layer POSITIONS[k]."""
    out = {f"{branch}/{k}": v for k, v in hf.items() if not k.startswith("layers_")}
    for k, pos in enumerate(POSITIONS):
        out.update({f"{branch}/layers_{k}/{name[len(f'layers_{pos}/'):]}": v for name, v in hf.items()
                    if name.startswith(f"layers_{pos}/")})
    return out


def _assert_equal(params, want, what):
    assert set(want) <= set(params), sorted(set(want) - set(params))[:5]
    bad = [k for k in want if not np.array_equal(params[k], want[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def test_iaa_branches_copy_the_loaded_llm_in_every_stage(hf_dir, tmp_path):
    hf = _hf_as_mm(hf_dir)
    one = jax.devices()[:1]
    d1, d2 = tmp_path / "s1", tmp_path / "s2"

    c1 = _cfg(hf_dir, "stage1", llm_checkpoint=str(hf_dir))
    p1 = _params(loop.build(c1, log=False, devices=one))
    _assert_equal(p1, {f"base/{k}": v for k, v in hf.items()}, "stage 1 base")
    _assert_equal(p1, _copies_of_base("mm", hf), "stage 1 mm branch")
    loop.train(c1, d1, devices=one)
    proj1 = {k: v for k, v in _params(loop.build(_cfg(hf_dir, "stage1", checkpoint=str(d1)), log=False,
                                                  devices=one)).items() if k.startswith("mm/projector/")}

    # Stage 2 names only the previous stage: the base comes from stage 1's frozen source (the HF dir), the
    # projector is stage 1's trained one, everything else of `mm` is copied from that base.
    c2 = _cfg(hf_dir, "stage2", checkpoint=str(d1))
    c2.mesh.update(dict(data=1, fsdp=4, tensor=2))
    b2 = loop.build(c2, log=False)
    assert c2.init.llm_checkpoint == str(hf_dir)
    sharded = b2.frozen["base"]["layers_1"]["mlp"]["gate_proj"]["kernel"].sharding
    assert sharded.shard_shape(hf["layers_1/mlp/gate_proj/kernel"].shape) != hf["layers_1/mlp/gate_proj/kernel"].shape
    p2 = _params(b2)
    _assert_equal(p2, {f"base/{k}": v for k, v in hf.items()}, "stage 2 base")
    _assert_equal(p2, _copies_of_base("mm", hf), "stage 2 mm branch")
    _assert_equal(p2, proj1, "stage 2 projector (stage 1's)")
    fresh = _params(loop.build(_cfg(hf_dir, "stage2", llm_checkpoint=str(hf_dir)), log=False, devices=one))
    assert not np.array_equal(fresh["mm/projector/linear_0/kernel"], proj1["mm/projector/linear_0/kernel"])

    c2 = _cfg(hf_dir, "stage2", checkpoint=str(d1))
    loop.train(c2, d2, devices=one)

    # Grounding: `g` is new (copies of the base), `mm` is what stage 2 trained - not the base, not a new copy.
    p3 = _params(loop.build(_cfg(hf_dir, "grounding", checkpoint=str(d2)), log=False, devices=one))
    _assert_equal(p3, {f"base/{k}": v for k, v in hf.items()}, "grounding base")
    _assert_equal(p3, _copies_of_base("g", hf), "grounding g branch")
    trained2 = {k: v for k, v in _params(loop.build(_cfg(hf_dir, "stage2", checkpoint=str(d2)), log=False,
                                                     devices=one)).items() if k.startswith("mm/")}
    _assert_equal(p3, trained2, "grounding mm branch (stage 2's)")
    moved = [k for k, v in _copies_of_base("mm", hf).items() if not np.array_equal(trained2[k], v)]
    assert len(moved) == len(_copies_of_base("mm", hf)), "stage 2 left some mm tensors at their initial copy"


def test_checkpoint_of_other_shapes_is_a_config_error(hf_dir):
    from mm.config import ConfigError

    c = _cfg(hf_dir, "stage1", llm_checkpoint=str(hf_dir))
    c.model.llm.intermediate_size = 128
    with pytest.raises(ConfigError, match=r"init.llm_checkpoint=.*: intermediate_size=96 but "
                                          r"model.llm.intermediate_size=128"):
        loop.build(c, log=False, devices=jax.devices()[:1])
