"""Attention and loss memory (and, on GPU/TPU, speed): fused kernels vs the naive XLA baselines.

For each sequence length, compiles forward+backward of (a) the naive XLA attention, which materialises
`[B, H, T, S]` float32 scores, and (b) the Pallas flash-attention kernel, and prints the compiled temporary
memory (`compiled.memory_analysis().temp_size_in_bytes`) and the ratio. Then the same for the chunked
cross-entropy vs the plain full-logits loss at vocab 128256.

Without an accelerator the Pallas kernels can only be compiled in interpret mode: Pallas lowers to Triton /
Mosaic from a CPU host (`lower(lowering_platforms=("cuda"|"tpu",))`), but compiling that needs the device
plugin, so the CPU figures are those of the interpreted kernel (same blocking, same residuals: inputs,
output, log-sum-exp). On GPU/TPU the real kernels are compiled and also timed against
`jax.nn.dot_product_attention` (xla and, on GPU, cudnn), with TFLOP/s.

    python bench/attention.py                    # CPU: memory only, GPU-kernel interpreter
    python bench/attention.py --kernel tpu       # CPU: TPU-kernel interpreter
    python bench/attention.py --lengths 1024,4096 --skip-loss
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mm.attention import attention, xla_attention  # noqa: E402
from mm.losses import chunked_cross_entropy, plain_cross_entropy  # noqa: E402

GiB = 2**30


def _temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
    compiled = jax.jit(fn).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _fwd_bwd(attn: Callable[..., jax.Array]) -> Callable[..., Any]:
    def f(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return vjp(out)
    return f


def attention_memory(lengths: list[int], kernel: str, batch: int, heads: int, kv_heads: int, head_dim: int) -> None:
    on_device = jax.default_backend() in ("gpu", "tpu")
    impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}[kernel]
    print(f"\n== attention fwd+bwd temp memory: B={batch} Hq={heads} Hkv={kv_heads} D={head_dim} bf16 causal; "
          f"kernel {impl} ({'compiled for the device' if on_device else 'interpret mode on CPU'})")
    print(f"{'seq':>7} {'naive XLA':>12} {'kernel':>12} {'ratio':>8}")
    prev = None
    for t in lengths:
        shape_q = jax.ShapeDtypeStruct((batch, t, heads, head_dim), jnp.bfloat16)
        shape_kv = jax.ShapeDtypeStruct((batch, t, kv_heads, head_dim), jnp.bfloat16)
        naive = _temp_bytes(_fwd_bwd(lambda q, k, v: xla_attention(q, k, v, causal=True)), shape_q, shape_kv, shape_kv)
        fused = _temp_bytes(_fwd_bwd(lambda q, k, v: attention(q, k, v, causal=True, implementation=impl,
                                                               interpret=not on_device)), shape_q, shape_kv, shape_kv)
        growth = "" if prev is None else f"   kernel x{fused / prev:.2f} per 2x seq"
        prev = fused
        print(f"{t:>7} {naive / GiB:>10.3f}Gi {fused / GiB:>10.3f}Gi {naive / max(fused, 1):>7.1f}x{growth}")


def loss_memory(tokens: int, hidden: int, vocab: int, chunk: int) -> None:
    print(f"\n== cross-entropy value+grad temp memory: N={tokens} D={hidden} V={vocab} bf16 inputs, chunk={chunk}")
    h = jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def vg(fn, **kw):
        return lambda h, w, y: jax.value_and_grad(lambda h, w: fn(h, w, y, **kw), argnums=(0, 1))(h, w)

    plain = _temp_bytes(vg(plain_cross_entropy), h, w, y)
    chunked = _temp_bytes(vg(chunked_cross_entropy, chunk_size=chunk), h, w, y)
    print(f"plain {plain / GiB:.3f}Gi  chunked {chunked / GiB:.3f}Gi  ratio {plain / max(chunked, 1):.1f}x "
          f"(left: dW being written, fp32 dH, one chunk of logits)")


def _time(fn: Callable[..., Any], *args: Any, iters: int = 10) -> float:
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def attention_speed(lengths: list[int], batch: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """Device only: fwd+bwd wall time and TFLOP/s of ours vs jax.nn.dot_product_attention."""
    backend = jax.default_backend()
    ours = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}[backend]
    impls: dict[str, Callable[..., Any]] = {
        ours: lambda q, k, v: attention(q, k, v, causal=True, implementation=ours),
        "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }
    if backend == "gpu":
        impls["jax.nn cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                             implementation="cudnn")
    print(f"\n== fwd+bwd time on {backend}: B={batch} Hq={heads} Hkv={kv_heads} D={head_dim} bf16 causal")
    for t in lengths:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (batch, t, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim), jnp.bfloat16)
        flops = 3.5 * 4 * batch * heads * t * t * head_dim / 2  # fwd 4BHTSD, bwd ~2.5x; causal halves
        base = None
        for name, fn in impls.items():
            try:
                sec = _time(_fwd_bwd(fn), q, k, v)
            except Exception as e:  # e.g. cudnn unavailable, or XLA OOM at long lengths
                print(f"{t:>7} {name:>14}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            base = base or sec
            print(f"{t:>7} {name:>14}: {sec * 1e3:8.2f} ms  {flops / sec / 1e12:6.1f} TFLOP/s  "
                  f"x{base / sec:.2f} vs {ours}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--kernel", choices=["gpu", "tpu"], default=None, help="default: the device's, else gpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--loss-tokens", type=int, default=8192)
    p.add_argument("--loss-hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--skip-loss", action="store_true")
    a = p.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    backend = jax.default_backend()
    kernel = a.kernel or (backend if backend in ("gpu", "tpu") else "gpu")
    attention_memory(lengths, kernel, a.batch, a.heads, a.kv_heads, a.head_dim)
    if not a.skip_loss:
        loss_memory(a.loss_tokens, a.loss_hidden, a.vocab, a.loss_chunk)
    if backend in ("gpu", "tpu"):
        attention_speed(lengths, a.batch, a.heads, a.kv_heads, a.head_dim)
    else:
        print("\n(no GPU/TPU: timing against jax.nn.dot_product_attention skipped)")


if __name__ == "__main__":
    main()
