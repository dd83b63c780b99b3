"""POINTS' dual-ViT step against the single-ViT one, same run: `configs/points.py` tiny preset, each stage built
with and without the OCR tower (`model.ocr_tower`), everything else equal (pixel shuffle on both).

    python bench/points.py [--stages pretrain,instruct] [--steps 10] [--rounds 3]

Prints seconds per training step of each model and the ratio dual / single per stage, side by side: the two
alternate for a few rounds and each keeps its best round; timings exclude the first (compiling) step. Beside
them, the ratio of the two models' FLOPs a step. At tiny shapes a step takes milliseconds and is dispatch-bound, so
the time ratio moves between runs far more than the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def built(stage: str, ocr_tower: bool):
    import jax

    from mm.config import load_config_file
    from mm.train import loop

    c = load_config_file(f"{ROOT}/configs/points.py:{stage}")
    c.unlock()
    c.model.ocr_tower = ocr_tower
    if not ocr_tower:  # one tower: nothing to freeze under ocr_vision
        c.param_groups = [(p.replace("|ocr_vision", ""), v) for p, v in c.param_groups]
    c.init.prng_impl = "unsafe_rbg"
    return c, loop.build(c, log=False, devices=jax.devices()[:1])


def compare(stage: str, steps: int, rounds: int) -> tuple[float, float, float]:
    """(single, dual) seconds a step - the two alternate for `rounds` rounds of `steps` steps, best round each (the
    machine's other load only ever adds time) - and the ratio of their model FLOPs a step (`mm.train.flops`)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from bench.step_timing import mean_step_seconds, synthetic_batches

    runs = [built(stage, False), built(stage, True)]
    data = [synthetic_batches(c, steps + 1) for c, _ in runs]
    starts = [jax.tree.map(jnp.copy, b.state) for _, b in runs]  # the step donates its state: each round a copy
    best = [float("inf")] * 2
    for _ in range(rounds):
        for i, (_, b) in enumerate(runs):
            fresh = dataclasses.replace(b, state=jax.tree.map(jnp.copy, starts[i]))
            best[i] = min(best[i], mean_step_seconds(fresh, data[i]))
    return best[0], best[1], runs[1][1].flops["total"] / runs[0][1].flops["total"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="pretrain,instruct")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{'stage':<10} {'single ViT s/step':>18} {'dual ViT s/step':>16} {'dual / single':>14} "
          f"{'FLOPs dual / single':>20}")
    for stage in args.stages.split(","):
        one, two, flops = compare(stage, args.steps, args.rounds)
        print(f"{stage:<10} {one:>18.4f} {two:>16.4f} {two / one:>14.2f} {flops:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
