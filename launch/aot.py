"""`mm-aot --config=configs/X.py:variant --topology=v5p-64 [--config.a.b=value]`: compile a run's train step
ahead of time for a TPU slice, on this (CPU) host, and print what it needs.

The step is the one `mm-train` runs (same build: shardings, remat, donation, chunked loss, the Pallas TPU
attention kernel through Mosaic), compiled by the real XLA TPU compiler from `libtpu` (the `tpu` extra:
`pip install -e '.[tpu]'`) for abstract devices of the topology; nothing is loaded or allocated, so checkpoint
and data paths in the config need not exist. Printed: per-device arguments / outputs / temp / total bytes against
the chip's HBM, XLA's FLOPs per device next to mm's analytic count, and the collectives XLA inserted. Exit status
3 when the step does not fit in HBM, 2 for a bad config; `--save=FILE` writes the serialised executable.
Also works on simulated CPU devices (`--topology=cpu:8`, with XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import cli

_PROG = "mm-aot"
_HINT = ("shard more (--config.mesh.fsdp / tensor), remat more (--config.model.llm.remat_policy=full), accumulate "
         "(--config.optim.grad_accum) or shrink the batch")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: path/to/config.py[:variant].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice (v5p-64, v5e-256, ...), a jax topology name "
                                "(v5p:2x4x4), or cpu:N for N simulated CPU devices")
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice topologies)")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM a device in GiB (default: the chip's)")
_SAVE = flags.DEFINE_string("save", "", "write the serialised compiled executable to this file")
_JSON = flags.DEFINE_string("json", "", "also write the report as JSON to this file")


def _devices(topology: str, slices: int) -> tuple[list, int]:
    import jax

    from mm.train import aot

    if topology.startswith("cpu:"):
        n = int(topology.split(":", 1)[1])
        devs = jax.devices("cpu")
        if len(devs) < n:
            raise ValueError(f"--topology={topology}: {len(devs)} CPU devices here (set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={n})")
        return devs[:n], 0
    return aot.tpu_devices(topology, slices)


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; abstract TPU devices need no TPU
    from mm.config import ConfigError
    from mm.profiling import compiled as compiled_lib
    from mm.train import aot
    from mm.train import schema as tcfg

    cfg = _CONFIG.value
    if cfg is None:
        return cli.report(_PROG, "--config is required")
    if "pipeline" in cfg:
        return cli.report(_PROG, f"{cfg.get('name', 'this config')} is a pipeline; compile one of its stages "
                                 "(its STAGE variant)")
    tpu = not _TOPOLOGY.value.startswith("cpu:")
    if tpu:  # the kernels a TPU run uses, unless the config chose
        for section in (cfg.model.llm, cfg.model.vision):
            if not section.get("attention_impl"):
                section.attention_impl = "pallas_tpu"
    try:
        devices, hbm = _devices(_TOPOLOGY.value, _SLICES.value)
        tcfg.validate(cfg, len(devices), compile_only=True)
        b, compiled = aot.compile_step(cfg, devices)
    except (ConfigError, ValueError) as e:
        return cli.report(_PROG, e)
    except aot.DoesNotFit as e:
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump({"topology": _TOPOLOGY.value, "fits": False, "compiler": str(e)}, f, indent=2)
        sys.stderr.write(f"{_PROG}: the step does not fit on {_TOPOLOGY.value}: {e}\n{_HINT}\n")
        return 3
    hbm = int(_HBM.value * compiled_lib.GIB) if _HBM.value else hbm
    r = compiled_lib.report(b, compiled, len(devices), hbm)
    r["topology"] = _TOPOLOGY.value
    sys.stdout.write(f"{_PROG}: {_TOPOLOGY.value} ({len(devices)} x {devices[0].device_kind}), mesh "
                     f"{dict(zip(b.mesh.axis_names, b.mesh.devices.shape))}\n{compiled_lib.format_report(r)}\n")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2)
    if _SAVE.value:
        from jax.experimental import serialize_executable

        payload, _, _ = serialize_executable.serialize(compiled)
        with open(_SAVE.value, "wb") as f:
            f.write(payload)
        sys.stdout.write(f"{_PROG}: wrote the executable to {_SAVE.value} ({len(payload):,} bytes)\n")
    if r["fits"] is False:
        sys.stderr.write(f"{_PROG}: the step needs {r['memory']['total'] / compiled_lib.GIB:.2f} GiB a device, "
                         "more than "
                         f"{hbm / compiled_lib.GIB:.2f} GiB of HBM\n{_HINT}\n")
        return 3
    return 0


def main() -> None:
    app.run(_run, flags_parser=cli.absl_flags_parser(_PROG))


if __name__ == "__main__":
    main()
