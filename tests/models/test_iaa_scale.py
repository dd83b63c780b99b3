"""IAA-14 on Llama-3-8B shapes lowers and compiles for 8 devices (FSDP x tensor) from abstract shapes only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm import sharding as sh
from mm.config import LLMConfig
from mm.models import iaa

LLAMA3_8B = LLMConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=500000.0, dtype="bfloat16", param_dtype="bfloat16")


def test_iaa14_llama3_8b_compiles_sharded_and_reports_memory(capsys):
    cfg = iaa.preset("iaa14", LLAMA3_8B, vision_width=1024, branches=("mm",))
    boxed = iaa.abstract_params(cfg)
    mesh = sh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    pshard = sh.param_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=s), boxed,
                            pshard, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    b, t, m = 8, 256, 64
    bs, bs3 = sh.batch_sharding(mesh), sh.batch_sharding(mesh, 3)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=bs)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=bs)
    feats = jax.ShapeDtypeStruct((b, m, 1024), jnp.bfloat16, sharding=bs3)
    fn = sh.sharded_jit(
        lambda p, x, f, k: iaa.IAA(cfg).apply({"params": p}, x, workflow="mm", image_features=f, image_mask=k)[0],
        mesh, in_shardings=(pshard, bs, bs3, bs),
        out_shardings=sh.logical_sharding(mesh, ("act_batch", "act_length", "act_vocab")))
    stats = fn.lower(abstract, ids, feats, mask).compile().memory_analysis()

    leaves = jax.tree.leaves(abstract)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
    # The mm workflow never reads the base embedding / head / final norm; XLA drops those arguments.
    unused = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                 for x in jax.tree.leaves({k: abstract["base"][k] for k in ("embed_tokens", "lm_head", "norm")}))
    inputs = (b * t * 4 + b * t + b * m * 1024 * 2) // 8
    assert abs(total / 8 - per_device) / per_device < 0.01  # every large parameter is split 8 ways
    assert abs(stats.argument_size_in_bytes - (per_device - unused + inputs)) / per_device < 0.01
    with capsys.disabled():
        print(f"\nIAA-14 / Llama-3-8B bf16, 8 devices (fsdp 4 x tensor 2), batch {b} x {t}: "
              f"params {total / 1e9:.2f} GB "
              f"total, {per_device / 1e9:.3f} GB per device; compiled forward: arguments "
              f"{stats.argument_size_in_bytes / 1e9:.3f} GB, temp {stats.temp_size_in_bytes / 1e9:.2f} GB, "
              f"output {stats.output_size_in_bytes / 1e9:.3f} GB per device")
