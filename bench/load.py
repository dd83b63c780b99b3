"""Loading a base LLM checkpoint into a train run's sharded params: peak host RSS against the checkpoint size.

    python bench/load.py --preset 8b               # tiny | 1b | 8b (the checkpoints of bench/convert.py)
    python bench/load.py --preset 1b --baseline    # also the old path, side by side

Each step runs in its own subprocess on 8 simulated CPU devices, mesh fsdp 8, so its peak RSS
(`os.wait4` rusage) is its own:
  read     read every byte of the safetensors files (the I/O floor),
  placed   `mm.train.initial_params.load_base_llm`: what `mm-train --config.init.llm_checkpoint=` does - each
           param read region by region straight into its sharded array, params kept in the checkpoint's bf16,
  host     (--baseline) the previous path: the whole model read into host numpy, then `device_put` onto the
           same shardings (the host copy and the device copy coexist: ~2x the checkpoint).
On CPU the "devices" live in host memory, so the loaded params themselves count in RSS: the floor for any
loader here is 1.0x the checkpoint. Prints seconds, peak RSS, RSS / checkpoint size and seconds vs read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.convert import GIB, PRESETS, drop_cache, make_checkpoint, read_all, run_child  # noqa: E402


def _setup(src: Path):
    """Model shardings of the preset's LLM (mesh fsdp 8, bf16 params) and the model adapter."""
    from mm import sharding as shd
    from mm.train import models, param_groups as pg
    from mm.train.schema import base_config
    from mm.train.from_checkpoints import llm_section

    cfg = base_config()
    cfg.model.kind = "llm"
    cfg.model.llm.update(llm_section(src))
    cfg.model.llm.param_dtype = "bfloat16"
    model = models.build(cfg)
    mesh = shd.make_mesh({"fsdp": 8})
    flat_sh = pg.flatten(shd.param_shardings(model.abstract, mesh, shd.rules_from_overrides(None)))
    return model, flat_sh


def load_placed(src: Path) -> None:
    import jax

    from mm.train.initial_params import load_base_llm

    model, flat_sh = _setup(src)
    out = load_base_llm(src, model, flat_sh)
    jax.block_until_ready(out)
    print(f"placed: {len(out)} params, {sum(x.nbytes for x in out.values()) / GIB:.2f} GiB", flush=True)


def load_host(src: Path) -> None:
    import jax
    import numpy as np

    from mm.convert.registry import load
    from mm.train import param_groups as pg

    model, flat_sh = _setup(src)
    _, tree = load(src, dtype="bfloat16")
    out = {k: jax.device_put(np.asarray(v), flat_sh[k]) for k, v in pg.flatten(tree).items()}
    jax.block_until_ready(out)
    print(f"host: {len(out)} params, {sum(x.nbytes for x in out.values()) / GIB:.2f} GiB", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/mm-bench").expanduser())
    ap.add_argument("--baseline", action="store_true", help="also time the whole-model-on-host path")
    ap.add_argument("--_step", choices=("placed", "host"), help=argparse.SUPPRESS)
    ap.add_argument("--_src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_read", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._read:
        return read_all(args._read)
    if args._generate:
        make_checkpoint(args.preset, args.cache_dir)
        return None
    if args._step:
        return {"placed": load_placed, "host": load_host}[args._step](args._src)

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    run_child([sys.executable, __file__, "--_generate", "--preset", args.preset, "--cache-dir", str(args.cache_dir)])
    src = args.cache_dir / f"hf-{args.preset}-bf16"
    files = sorted(str(f) for f in src.glob("*.safetensors"))
    nbytes = sum(os.path.getsize(f) for f in files)
    results = {}
    drop_cache(src)
    results["read"] = run_child([sys.executable, __file__, "--_read", *files])
    for step in ("placed", "host") if args.baseline else ("placed",):
        drop_cache(src)
        results[step] = run_child([sys.executable, __file__, "--_step", step, "--_src", str(src)])
    print(f"\npreset {args.preset}: {nbytes / GIB:.2f} GiB of bf16 safetensors in {len(files)} file(s); "
          f"8 CPU devices, mesh fsdp 8; load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"{'step':<8} {'seconds':>8} {'CPU s':>7} {'peak RSS GiB':>13} {'RSS / checkpoint':>17} {'time vs read':>13}")
    read_s = results["read"][0]
    for step, (sec, rss, cpu) in results.items():
        print(f"{step:<8} {sec:8.1f} {cpu:7.1f} {rss / GIB:13.2f} {rss / nbytes:16.2f}x {sec / read_s:12.2f}x")
    return None


if __name__ == "__main__":
    main()
