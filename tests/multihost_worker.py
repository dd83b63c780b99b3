"""One process of the multi-host test: joins a 2-process CPU cluster (gloo), runs a sharded forward over the
global 8-device mesh, and prints the max difference against a local single-device forward of the same model.
Given an HF checkpoint dir, it also reads it straight onto an fsdp mesh over both hosts (`mm.convert.placed`)
and prints the difference of its local shards against the whole in-memory load, and how many bytes it read."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from mm import sharding as sh  # noqa: E402
from mm.config import LLMConfig  # noqa: E402
from mm.models import llm  # noqa: E402


def main() -> None:
    port, pid = sys.argv[1], int(sys.argv[2])
    sh.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)
    params = llm.init_params(cfg, jax.random.PRNGKey(0))  # same seed: same values on both hosts
    ids = np.random.RandomState(0).randint(0, 64, (8, 16)).astype(np.int32)
    with jax.default_device(jax.local_devices()[0]):
        ref = np.asarray(llm.LLM(cfg).apply({"params": params}, ids)[0])

    mesh = sh.make_mesh((2, 2, 2))
    pshard = sh.param_shardings(llm.abstract_params(cfg), mesh)
    placed = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]),
                          params, pshard)
    bsh = sh.batch_sharding(mesh)
    local = ids[pid * 4:(pid + 1) * 4]  # each host feeds its own half of the global batch
    batch = jax.make_array_from_process_local_data(bsh, local, ids.shape)
    fwd = sh.sharded_jit(lambda p, x: llm.LLM(cfg).apply({"params": p}, x)[0], mesh,
                         in_shardings=(pshard, bsh), out_shardings=sh.replicated(mesh))
    out = np.asarray(fwd(placed, batch))
    print(f"MAXERR {np.abs(out - ref).max():.3e}", flush=True)
    if len(sys.argv) > 3:
        placed_load(sys.argv[3])
    jax.distributed.shutdown()


def placed_load(hf_dir: str) -> None:
    from mm.convert.registry import load
    from mm.checkpoints.safetensors_io import SafetensorsCheckpoint

    read = [0]
    plain_read = SafetensorsCheckpoint.read_rows

    def counting(self, *args, **kw):
        out = plain_read(self, *args, **kw)
        read[0] += out.nbytes
        return out

    config, whole = load(hf_dir)
    whole = traverse_util.flatten_dict(whole)
    SafetensorsCheckpoint.read_rows = counting  # from here on: the regions the placed load reads
    mesh = sh.make_mesh({"fsdp": 8})
    flat_sh = traverse_util.flatten_dict(sh.param_shardings(llm.abstract_params(config), mesh))
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        total = sum(t.nbytes for t in ckpt.tensors.values())
    got = traverse_util.flatten_dict(load(hf_dir, dtype="float32", shardings=flat_sh)[1])
    err = max(float(np.abs(np.asarray(s.data) - whole[p][s.index]).max()) for p, a in got.items()
              for s in a.addressable_shards)
    print(f"PLACED {err:.3e} {read[0]} {total}", flush=True)


if __name__ == "__main__":
    main()
