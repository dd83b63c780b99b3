"""Model FLOPs per training step, peak FLOP/s per accelerator, MFU.

Counting rule (per token, matmuls only; `Stage`s come from `mm.models.protocol`, listed by each model kind):
- every matmul weight costs `2 * size` forward;
- its weight gradient (`2 * size`) only if the weight is trainable;
- its input gradient (`2 * size`) only if some trainable parameter sits *before* it in the forward order
  (otherwise no gradient has to flow through it). So a frozen vision tower or a frozen LLM under a trainable
  head is forward-only, while a frozen LLM under a trainable projector (LLaVA stage 1) pays its input
  gradients: that work really runs.
- attention core: `4 * T * heads * head_dim` forward, halved for causal masking; backward `2x` forward when
  a gradient flows through it.
Remat recomputation is not model FLOPs and is not counted.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from mm.train import param_groups as pg
from mm.models.protocol import Stage
from mm.train.param_groups import Assignment

# Dense bf16 peak FLOP/s per chip / GPU (vendor figures).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak for a `jax.Device.device_kind`; None (MFU n/a) for CPUs and unknown devices."""
    best = None
    for name, value in PEAK_FLOPS.items():
        if device_kind.startswith(name) or name in device_kind:
            if best is None or len(name) > len(best[0]):
                best = (name, value)
    return None if best is None else best[1]


def step_flops(stages: Iterable[Stage], sizes: Mapping[str, int], assignment: Assignment, tokens: int
               ) -> dict[str, float]:
    """Forward / backward model FLOPs of one optimizer step over `tokens` tokens (`sizes` from `shapes_sizes`)."""
    fwd = bwd = 0.0
    upstream = {"": False}  # per branch (`Stage.branch`): is a trainable param upstream of here

    def trainable(p: str) -> bool:
        return assignment.is_trainable(p if p in assignment.value_of else pg.scanned_name(p))

    for st in stages:
        if not st.branch:  # the main stream: everything before it, every branch included
            upstream[""] = any(upstream.values())
        upstream_trainable = upstream.get(st.branch, False)
        here = [p for p in (*st.weights, *st.touches) if p in sizes]
        for w in st.weights:
            if w not in sizes:
                continue
            f = 2.0 * sizes[w] * st.token_factor
            fwd += f
            if trainable(w):
                bwd += f
            if upstream_trainable:
                bwd += f
        if st.attn_flops:
            a = st.attn_flops * st.token_factor
            fwd += a
            if upstream_trainable:
                bwd += 2.0 * a
        upstream[st.branch] = upstream_trainable or any(trainable(p) for p in here)
    return {"forward": fwd * tokens, "backward": bwd * tokens, "total": (fwd + bwd) * tokens}


def format_peak_table() -> str:
    return "\n".join(f"  {k:<14} {v / 1e12:7.0f} TFLOP/s" for k, v in PEAK_FLOPS.items())


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, device_kind: str) -> float | None:
    peak = peak_flops(device_kind)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / n_devices / peak


def xla_flops(compiled: Any) -> float:
    """FLOPs XLA's cost model reports for a compiled computation (summed over its modules)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in ca))
    return float(ca.get("flops", 0.0))


def shapes_sizes(flat_shapes: Mapping[str, Any]) -> dict[str, int]:
    """Element count per param path. Stages name per-layer params (`layers_3/...`); a scanned tree (`nn.scan`:
    `layers/layer/...`, one array with a leading layer axis) also gets each layer's slice under its per-layer
    name, so scanned and unscanned runs count the same FLOPs."""
    import math

    out = {p: int(math.prod(getattr(v, "shape", ()))) for p, v in flat_shapes.items()}
    for p, v in flat_shapes.items():
        head, found, rest = p.partition(pg.SCANNED)
        if found and (head == "" or head.endswith("/")) and getattr(v, "shape", ()):
            n = int(v.shape[0])
            for i in range(n):
                out[f"{head}layers_{i}/{rest}"] = out[p] // n
    return out
