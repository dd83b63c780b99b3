"""LoRA against full fine-tuning of the same model and batch, same run: memory at 8B scale, step speed on CPU.

    python bench/lora.py [--memory] [--speed] [--rank 32] [--alpha 256]

--memory  Llama-3-8B (bf16 compute, float32 params), LoRA r on every attention and MLP projection vs full
          fine-tuning, compiled ahead of time (`mm.train.aot`, nothing allocated) for 8 simulated CPU devices, or
          with `--topology=v5p-16` for a TPU slice by the XLA TPU compiler (FSDP over all devices, 1 x 2048 tokens
          a device): trainable params, optimizer-state bytes, and XLA's per-device arguments / temp / total.
--speed   a 50M-param Llama on this machine (float32, 4 x 256 tokens): tokens/s of the LoRA step vs the full
          fine-tuning step, timings after the compiling step.
With neither flag, both. Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 for --memory (set here when
unset, before jax is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                 dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True)
PROJ = r"layers(_\d+|/layer)/(self_attn|mlp)/.*"  # per-layer or scanned (`nn.scan`) names


def _config(llm: dict, lora: dict | None, batch: int, seq: int):
    from mm.train.schema import base_config

    c = base_config()
    c.model.llm.update(llm)
    c.data.kind = "synthetic_text"
    c.train.update(dict(batch_size=batch, seq_len=seq, steps=1000, loss_chunk=2048))
    c.init.prng_impl = "unsafe_rbg"
    c.param_groups = [(PROJ, {"lora": lora}), (".*", "frozen")] if lora else [(".*", 1.0)]
    return c


def memory_table(rank: int, alpha: float, topology: str) -> None:
    import jax

    from mm.profiling import compiled as compiled_lib
    from mm.train import aot

    devices, hbm = (jax.devices()[:8], 0) if topology == "cpu:8" else aot.tpu_devices(topology)
    rows = []
    for name, lora in (("full fine-tuning", None), (f"LoRA r={rank}", {"rank": rank, "alpha": alpha})):
        c = _config(LLAMA3_8B, lora, batch=len(devices), seq=2048)
        c.mesh.update(dict(data=1, fsdp=len(devices), tensor=1))
        if topology != "cpu:8":
            c.model.llm.attention_impl = "pallas_tpu"
        t0 = time.perf_counter()
        b, compiled = aot.compile_step(c, devices)
        m, n = compiled_lib.memory(compiled), compiled_lib.trainable_counts(b)
        rows.append((name, n, m))
        print(f"  compiled {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    gib = 1024 ** 3
    print(f"\nLlama-3-8B on {topology}: {len(devices)} x {devices[0].device_kind} (FSDP {len(devices)})"
          f"{f', {hbm / gib:.0f} GiB HBM each' if hbm else ''}; bf16 compute / f32 params, 1 x 2048 tokens a "
          "device, remat full, scanned layers")
    print(f"{'':<18} {'trainable':>15} {'optimizer':>11} {'args/dev':>10} {'temp/dev':>10} {'total/dev':>10}")
    for name, n, m in rows:
        print(f"{name:<18} {n['trainable']:>15,} {n['optimizer_bytes'] / gib:>9.2f}Gi {m.arguments / gib:>8.2f}Gi "
              f"{m.temp / gib:>8.2f}Gi {m.total / gib:>8.2f}Gi")
    (_, nf, mf), (_, nl, ml) = rows
    print(f"LoRA / full: trainable {nl['trainable'] / nf['trainable']:.4f}x, optimizer "
          f"{nl['optimizer_bytes'] / nf['optimizer_bytes']:.4f}x, per-device total {ml.total / mf.total:.3f}x")


def tokens_per_s(lora: dict | None, steps: int) -> float:
    import jax

    from bench.step_timing import LLM_50M, mean_step_seconds, synthetic_batches
    from mm.train import loop

    batch, seq = 4, 256
    c = _config(LLM_50M, lora, batch, seq)
    c.train.loss_chunk = 0
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    return batch * seq / mean_step_seconds(b, synthetic_batches(c, steps + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=256.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topology", default="cpu:8", help="cpu:8 (simulated) or a TPU slice for mm-aot (v5p-16, ...)")
    a = ap.parse_args()
    both = not (a.memory or a.speed)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if a.memory or both:
        memory_table(a.rank, a.alpha, a.topology)
    if a.speed or both:
        full = tokens_per_s(None, a.steps)
        lo = tokens_per_s({"rank": a.rank, "alpha": a.alpha}, a.steps)
        print(f"\n50M Llama, 4 x 256 tokens, float32, 1 CPU device: full fine-tuning {full:,.0f} tok/s, "
              f"LoRA r={a.rank} {lo:,.0f} tok/s ({lo / full:.2f}x)")


if __name__ == "__main__":
    main()
