"""`mm-train --config=configs/X.py:variant --config.a.b=value --workdir=DIR`: train one stage.

The config is resolved (file + overrides), validated before anything heavy (errors: one line naming the key,
exit status 2; `launch.cli`), printed and saved as `DIR/config.json`. Runs resume automatically from the newest
finished checkpoint in DIR. A config with a top-level `pipeline` key (`configs/demo.py`, the main job) runs that
multi-stage pipeline instead of one stage. Multi-process: set `--config.distributed.coordinator=host:port
--config.distributed.num_processes=N --config.distributed.process_id=i` (or use `python -m launch.local_cluster`).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from launch import cli

_PROG = "mm-train"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config: path/to/config.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, metrics, profiles.")


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    from mm.config import ConfigError
    from mm.train import schema as tcfg

    cfg = _CONFIG.value
    if cfg is None or not _WORKDIR.value:
        return cli.report(_PROG, "--config and --workdir are required")
    if "pipeline" in cfg:
        return _run_pipeline(cfg, _WORKDIR.value)
    try:
        tcfg.validate(cfg)  # no jax yet: schema, types, paths
    except ConfigError as e:
        return cli.report(_PROG, e)
    d = cfg.distributed  # explicit flags, or nothing on TPU pods and SLURM (mm.sharding.cluster_environment)
    from mm.sharding import initialize_distributed

    initialize_distributed(d.coordinator or None, int(d.num_processes), int(d.process_id))
    from mm.train.loop import NonFiniteError, train

    try:
        result = train(cfg, _WORKDIR.value)
    except ConfigError as e:
        return cli.report(_PROG, e)
    except NonFiniteError as e:
        sys.stderr.write(f"mm-train: stopped: {e}\n")
        return 3
    sys.stdout.write(f"mm-train: {'preempted' if result.preempted else 'finished'} at step {result.last_step} "
                     f"(skipped updates: {result.skipped})\n")
    return 0


# values of a config's `pipeline` key -> the module (with check() and run()) that runs it
PIPELINES = {"demo": "demo_app.demo_run", "soups": "demo_app.soups_run", "bpo": "demo_app.bpo_run"}


def _run_pipeline(cfg, workdir: str) -> int:
    from mm.config import ConfigError

    if cfg.pipeline not in PIPELINES:
        return cli.report(_PROG, f"config key 'pipeline' = {cfg.pipeline!r}: known pipelines are {list(PIPELINES)}")
    import importlib

    mod = importlib.import_module(PIPELINES[cfg.pipeline])

    try:
        mod.check(cfg, workdir)  # every stage's config, before any work
        mod.run(cfg, workdir)
    except ConfigError as e:
        return cli.report(_PROG, e)
    return 0


def main() -> None:
    app.run(_run, flags_parser=cli.absl_flags_parser(_PROG))


if __name__ == "__main__":
    main()
