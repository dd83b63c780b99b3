"""Preference (DPO) step time against a plain SFT step of the same model and batch, same run.

    python bench/preference.py [--sizes tiny,50m] [--kinds llm,vlm] [--steps 3]

For each model size and kind, three train steps are compiled from `mm.train.loop.build` on the same weights and
the same B x L token rows:
  sft         next-token loss on B rows;
  dpo         B pairs (the rows as chosen, B other rows as rejected) with the reference held in the step (policy
              forward + backward on 2B rows, reference forward on 2B rows);
  dpo-precomp the same pairs with `dpo.precompute_reference` (batches bring the reference sums; no reference
              forward, no reference params).
Prints ms/step and the ratios dpo / sft and dpo-precomp / sft next to the ratio of model FLOPs the trainer
counts. Timings exclude the first (compiling) step; float32, this machine's CPU, one device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_timing import LLM_50M, TINY  # noqa: E402

# name: llm shape, vision width, image tokens, batch, seq
SIZES = {"tiny": (TINY, 32, 4, 8, 64), "50m": (LLM_50M, 256, 32, 4, 256)}
MODES = ("sft", "dpo", "dpo-precomp")
_STUB = tempfile.mkdtemp(prefix="bench_preference_")


def _config(size: str, kind: str, mode: str):
    from mm.train.schema import base_config

    llm, vw, n_img, batch, seq = SIZES[size]
    c = base_config()
    c.model.kind = kind
    c.model.llm.update(llm)
    if kind == "vlm":  # a ViT in the step, on raw pixels (the preference loss runs it once per image)
        c.data.num_image_tokens = n_img
    c.data.kind = "synthetic_mm" if kind == "vlm" else "synthetic_text"
    c.train.update(dict(batch_size=batch, seq_len=seq, steps=1000))
    c.init.prng_impl = "unsafe_rbg"
    if mode != "sft":  # the step only: batches come from _batches, validation only asks that the files exist
        c.data.update(dict(kind="preference", path=_STUB, tokenizer=_STUB))
        c.dpo.update(dict(loss_type=["sigmoid"], beta=0.1, precompute_reference=mode == "dpo-precomp"))
    return c


def _batches(size: str, kind: str, mode: str, n: int):
    """`n` host batches: SFT rows, or pairs whose chosen half is the SFT batch and rejected half other rows
    (prompt = the first quarter of each row, loss on the rest, as a preference pair's completion)."""
    import numpy as np

    from bench.step_timing import synthetic_batches

    c = _config(size, kind, "sft")
    out = []
    for i, (x, rej) in enumerate(zip(synthetic_batches(c, n), synthetic_batches(c, n, first=10_000))):
        if mode != "sft":
            seq = x["loss_mask"].shape[-1]
            pair = {}
            for half, b in (("chosen", x), ("rejected", rej)):
                b = dict(b)
                b["loss_mask"] = b["loss_mask"].copy()
                b["loss_mask"][..., : seq // 4] = 0.0
                pair.update({f"{half}/{k}": v for k, v in b.items()})
                if mode == "dpo-precomp":
                    pair[f"{half}/ref_logps"] = -np.abs(np.random.default_rng(i).standard_normal(
                        b["loss_mask"].shape[:-1])).astype(np.float32) * seq
            x = pair
        out.append(x)
    return out


def step_ms(size: str, kind: str, mode: str, steps: int) -> tuple[float, float]:
    """(mean ms per step after the first, model FLOPs per step as the trainer counts them)."""
    import jax

    from bench.step_timing import mean_step_seconds
    from mm.train import loop

    b = loop.build(_config(size, kind, mode), log=False, devices=jax.devices()[:1])
    return 1e3 * mean_step_seconds(b, _batches(size, kind, mode, steps + 1)), float(b.flops["total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,50m")
    ap.add_argument("--kinds", default="llm,vlm")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    import jax

    print(f"device: {jax.devices()[0].device_kind}; {a.steps} timed steps after the compiling one")
    print(f"{'size':<5} {'kind':<6} {'B x L':>8} {'sft ms':>9} {'dpo ms':>9} {'precomp ms':>11} "
          f"{'dpo/sft':>8} {'(FLOPs)':>8} {'precomp/sft':>12} {'(FLOPs)':>8}")
    for size in a.sizes.split(","):
        _, _, _, batch, seq = SIZES[size]
        for kind in a.kinds.split(","):
            r = {mode: step_ms(size, kind, mode, a.steps) for mode in MODES}
            (s, fs), (d, fd), (p, fp) = (r[m] for m in MODES)
            print(f"{size:<5} {kind:<6} {f'{batch}x{seq}':>8} {s:9.1f} {d:9.1f} {p:11.1f} {d / s:7.2f}x "
                  f"{fd / fs:7.2f}x {p / s:11.2f}x {fp / fs:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
