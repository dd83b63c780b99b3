"""Ahead-of-time compile of a run's train step, and what XLA says it needs per device.

`compile_step(cfg, devices)` builds the run as `mm-train` would (`mm.train.loop.build(abstract=True)`: params,
reference and optimizer state are shapes on their shardings, nothing is loaded or allocated), lowers the step on
one abstract batch of the config's shapes and compiles it for `devices` (8 simulated CPU devices, or abstract TPU
devices from `jax.experimental.topologies`: `tpu_devices("v5p-8")` runs the real XLA TPU compiler on a CPU host,
with `libtpu` installed, Pallas TPU kernels through Mosaic included). `mm.profiling.compiled.report` says what
XLA made of it next to the chip's HBM and mm's analytic FLOPs (`mm-aot`, `launch/aot.py`).
"""

from __future__ import annotations

from typing import Any

import jax

from mm.profiling.compiled import GIB


def _grain_shapes(cfg: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of one global batch of the Grain pipeline (`mm.train.grain_source`) for the config."""
    import numpy as np

    from mm.train.schema import has_tower, vision_config_from

    accum = int(cfg.optim.grad_accum)
    lead = (accum, int(cfg.train.batch_size) // accum)
    tokens = lead + (int(cfg.train.seq_len),)
    out: dict[str, tuple[tuple[int, ...], Any]] = {k: (tokens, np.int32) for k in
                                                   ("input_ids", "labels", "segment_ids", "positions")}
    out["loss_mask"] = (tokens, np.float32)
    out["loss_weight"] = (lead, np.float32)
    if cfg.model.kind != "llm" and has_tower(cfg):
        v = vision_config_from(cfg)
        tiles = int(cfg.data.max_tiles_per_row)
        out["image_mask"] = (tokens, np.bool_)
        out["pixel_values"] = (lead + (tiles, v.num_channels, v.image_size, v.image_size), np.float32)
        out["tile_mask"] = (lead + (tiles,), np.bool_)
    if cfg.data.kind == "preference":
        pairs = {f"{h}/{k}": v for h in ("chosen", "rejected") for k, v in out.items()}
        if cfg.dpo.precompute_reference:  # the reference's sums come with the batch
            pairs.update({f"{h}/ref_logps": (lead, np.float32) for h in ("chosen", "rejected")})
        return pairs
    return out


def abstract_batch(cfg: Any, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch's shapes, on `batch_sharding`: synthetic kinds from their source, the Grain kinds
    (`llava_json`, `preference`) from the config (seq_len, tiles per row, the ViT's image size)."""
    from mm.train.schema import GRAIN_KINDS

    if cfg.data.kind in GRAIN_KINDS:
        return {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding) for k, (shape, dt) in
                _grain_shapes(cfg).items()}
    from mm.train.synthetic_source import SyntheticSource

    x = SyntheticSource(cfg).batch_at(0)
    x.pop("example_id")
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in x.items()}


class DoesNotFit(Exception):
    """The TPU compiler refused the step: it needs more HBM than a chip has (XLA's own figures in the message)."""


def compile_step(cfg: Any, devices: list[Any]) -> tuple[Any, Any]:
    """(the abstract `Built`, the compiled step). DoesNotFit when the compiler runs out of device memory (the
    TPU compiler refuses a program whose buffers exceed HBM; the CPU compiler never does)."""
    from mm.train import loop

    b = loop.build(cfg, log=False, devices=devices, abstract=True)
    lowered = b.step_fn.lower(b.state, b.frozen, abstract_batch(cfg, b.batch_sharding))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")) from None
    return b, compiled


HBM = {"v4": 32 * GIB, "v5p": 95 * GIB, "v5e": 16 * GIB, "v6e": 32 * GIB}  # a chip's HBM
# slice name -> jax topology name; v4 / v5p names count TensorCores (2 a chip), v5e / v6e names count chips
TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-8": "v6e:2x4", "v6e-256": "v6e:16x16",
}


def tpu_devices(topology: str, num_slices: int = 1) -> tuple[list[Any], int]:
    """(abstract TPU devices of `topology` - a slice name like "v5p-64" or a jax topology like "v5p:2x4x4" -,
    HBM bytes of one chip). Needs `libtpu` (the `tpu` extra); runs on a CPU host."""
    import os

    # a CPU host has no TPU metadata server to ask (libtpu would print errors while it finds none), and tests
    # and compiles may run side by side (libtpu otherwise locks itself to one process)
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                 ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(k, v)
    from jax.experimental import topologies

    name = TOPOLOGIES.get(topology, topology)
    hbm = HBM.get(name.split(":")[0], 0)
    if ":" not in name:
        raise ValueError(f"unknown TPU topology {topology!r}: one of {sorted(TOPOLOGIES)} or a jax topology name "
                         "like 'v5p:2x2x1'")
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
    return list(desc.devices), hbm


