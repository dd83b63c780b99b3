"""LoRA adapters exchanged with HF PEFT 0.21 (`mm.convert.peft_adapter`), PEFT being the reference.

- A PEFT adapter (B made non-zero) on a tiny random HF Llama gives PEFT's logits through
  `mm.from_pretrained(base, adapter=dir)` (<= 1e-4 on 320 tokens), for plain LoRA, rsLoRA with a rank pattern,
  and a subset of modules on a Qwen2 (biases on q / k / v).
- An adapter trained in mm (`init.llm_checkpoint` = the HF base) exported with `--lora-format peft` loads with
  `peft.PeftModel.from_pretrained` and gives mm's logits of the trained (unmerged) model; the merged export
  (`--merge-lora`) equals PEFT's `merge_and_unload()` weights within 1e-6; `init.lora_checkpoint` starts a run
  from a PEFT dir with PEFT's adapters exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mm.config import ConfigError
from tests.helpers.hf_models import load_hf, make_llama, make_qwen2

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TOKENS = 320


def _ids(vocab, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=(2, N_TOKENS // 2))


def _peft_adapter(base, out, seed=1, **lora_kw):
    """A PEFT LoRA adapter on `base` with every lora_A / lora_B random (B non-zero), saved to `out`; returns
    the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = load_hf(base)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(out))
    return peft_model.eval()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("family, lora_kw", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=ALL)),
    ("llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL, rank_pattern={"down_proj": 2},
                   alpha_pattern={"q_proj": 3.0})),
    ("qwen2", dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
])
def test_peft_adapter_loads_into_mm_with_peft_logits(tmp_path, family, lora_kw):
    import mm

    base = (make_llama if family == "llama" else make_qwen2)(tmp_path)
    peft_model = _peft_adapter(base, tmp_path / "adapter", **lora_kw)
    vocab = peft_model.config.vocab_size
    ids = _ids(vocab)
    want = _torch_logits(peft_model, ids)
    plain = _torch_logits(load_hf(base), ids)
    got = mm.from_pretrained(base, adapter=tmp_path / "adapter").logits(ids)
    print(f"{family} {sorted(lora_kw)}: max |logit diff| mm vs PEFT {np.abs(got - want).max():.2e} "
          f"(adapter's own effect {np.abs(want - plain).max():.2e})")
    assert np.abs(want - plain).max() > 1e-2  # the adapter matters: the check can fail
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_adapter_errors_name_the_file_and_module(tmp_path):
    import mm

    base = make_llama(tmp_path)
    _peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"adapter_config\.json: use_dora = True is not supported"):
        mm.from_pretrained(base, adapter=tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj' has rank 4 but adapter_config"):
        mm.from_pretrained(base, adapter=tmp_path / "adapter")
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        mm.from_pretrained(base, adapter=tmp_path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run on the HF base (all projections, r 4, alpha 8; lr high enough to move B far from 0)."""
    import jax

    from mm.train import loop
    from mm.train.schema import base_config
    from mm.train.from_checkpoints import llm_section

    tmp = tmp_path_factory.mktemp("lora_run")
    base = make_llama(tmp)
    c = base_config()
    c.model.llm.update(llm_section(base))
    c.init.update(dict(llm_checkpoint=str(base), prng_impl="unsafe_rbg"))
    c.data.kind = "synthetic_text"
    c.param_groups = [(r"layers_\d+/(self_attn|mlp)/.*", {"lora": {"rank": 4, "alpha": 8}}), (".*", "frozen")]
    c.train.update(dict(steps=3, batch_size=4, seq_len=32, log_every=1))
    c.optim.update(dict(lr=5e-2, warmup_frac=0.0))
    c.checkpoint.update(dict(every=3, use_async=False))
    c.metrics.tensorboard = False
    loop.train(c, tmp / "run", devices=jax.devices()[:1])
    return {"base": base, "run": tmp / "run", "tmp": tmp, "cfg": c}


def _mm_logits(run, ids):
    """Logits of the trained model straight from the run's params (adapters applied on the activations)."""
    import jax.numpy as jnp

    from mm.models import llm
    from mm.train import schema as tcfg
    from mm.train.export import trained_params

    cfg, params, _ = trained_params(run)
    c = tcfg.llm_config_from(cfg)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return np.asarray(llm.LLM(c).apply({"params": params}, jnp.asarray(ids), pos)[0], np.float32)


def test_mm_trained_adapter_exports_to_peft_and_merges_like_peft(lora_run):
    from peft import PeftModel

    from mm.convert.llm_family import llm_name_map
    from flax.traverse_util import flatten_dict as flatten

    from mm.convert.registry import load, read_config
    from mm.train.export import export_run

    base, run, tmp = lora_run["base"], lora_run["run"], lora_run["tmp"]
    with pytest.raises(ConfigError, match="--merge-lora.*--lora-format peft"):
        export_run(run, tmp / "nothing")
    out = export_run(run, tmp / "peft", lora_format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(ALL)
    peft_model = PeftModel.from_pretrained(load_hf(base), str(out)).eval()
    ids = _ids(peft_model.config.vocab_size, seed=3)
    mine = _mm_logits(run, ids)
    theirs = _torch_logits(peft_model, ids)
    assert np.abs(mine - _torch_logits(load_hf(base), ids)).max() > 1e-2  # training moved the adapters
    print(f"mm-trained adapter in PEFT: max |logit diff| {np.abs(mine - theirs).max():.2e}")
    assert np.abs(mine - theirs).max() <= 1e-4, np.abs(mine - theirs).max()

    merged_dir = export_run(run, tmp / "merged", merge_lora=True)
    merged_hf = peft_model.merge_and_unload().state_dict()
    c = read_config(merged_dir)
    mine_params = flatten(load(merged_dir)[1])
    nm = llm_name_map(c)
    worst = 0.0
    for name, t in merged_hf.items():
        if nm.is_ignorable(name):
            continue
        path, want = nm.hf_to_mm(name, t.float().numpy())
        worst = max(worst, float(np.abs(np.asarray(mine_params[path], np.float32) - want).max()))
    print(f"merged export vs PEFT merge_and_unload: max |weight diff| {worst:.2e}")
    assert worst <= 1e-6, worst


def test_a_run_starts_from_a_peft_adapter(lora_run, tmp_path):
    import jax

    from mm.train import loop, param_groups as pg

    base = lora_run["base"]
    peft_model = _peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL)
    c = lora_run["cfg"].copy_and_resolve_references()
    c.init.lora_checkpoint = str(tmp_path / "adapter")
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    flat = pg.flatten(b.state["params"])
    a = flat["layers_1/self_attn/k_proj/lora_a"]  # mm A [in, r] is PEFT's lora_A.weight [r, in] transposed
    want = peft_model.base_model.model.model.layers[1].self_attn.k_proj.lora_A["default"].weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(a), want)
    ids = _ids(peft_model.config.vocab_size, seed=4)
    from mm.models import llm
    import jax.numpy as jnp

    params = pg.merge(b.state["params"], b.frozen)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    got = np.asarray(llm.LLM(b.model.llm_config).apply({"params": params}, jnp.asarray(ids), pos)[0])
    assert np.abs(got - _torch_logits(peft_model, ids)).max() <= 1e-4

    c.param_groups = [(r"layers_\d+/self_attn/.*", {"lora": {"rank": 4, "alpha": 8}}), (".*", "frozen")]
    with pytest.raises(ConfigError, match=r"init\.lora_checkpoint=.*in the dir only \['layers_0/mlp/"):
        loop.build(c, log=False, devices=jax.devices()[:1])
    c.param_groups = [(r"layers_\d+/(self_attn|mlp)/.*", {"lora": {"rank": 4, "alpha": 16}}), (".*", "frozen")]
    with pytest.raises(ConfigError, match="scale 2 in the dir, 4 from the rules"):
        loop.build(c, log=False, devices=jax.devices()[:1])
