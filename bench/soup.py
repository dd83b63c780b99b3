"""Soup benchmark: peak RSS of `mm-soup average` over N random checkpoints against one model's size, and its
throughput against a plain sequential read of the same bytes.

    python bench/soup.py --preset 1b             # tiny | 1b | 8b (Llama-3-8B shapes, bf16, 14.96 GiB each)
    python bench/soup.py --preset 8b --models 3 --cache-dir /big/disk/mm-bench

The ingredients are `bench/convert.py`'s random bf16 checkpoints of the preset, drawn from seeds 0..N-1 (cached
in `--cache-dir`, never the repo; seed 0 is the one `bench/convert.py` uses). Each step runs in its own child
process so its peak RSS is its own (`os.wait4` rusage), with the page cache of our files dropped first:
  read   read every byte of the N checkpoints sequentially (the baseline),
  soup   `mm-soup average` of the N checkpoints into an HF dir (float32 accumulation, bf16 out).
Prints seconds, GiB/s of input, peak RSS and its ratios to one model's bytes and to (largest tensor x N), the
bound the streaming design aims for. The soup output is deleted afterwards; the ingredients stay cached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.convert import GIB, PRESETS, checkpoint_path, drop_cache, run_child  # noqa: E402


def largest_tensor_bytes(path: Path) -> int:
    from mm.checkpoints.safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(path) as ck:
        return max(t.nbytes for t in ck.tensors.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--models", type=int, default=3, help="number of ingredients")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/mm-bench").expanduser())
    ap.add_argument("--work-dir", type=Path, default=None, help="where the soup goes (default: inside --cache-dir)")
    args = ap.parse_args(argv)
    if args.models < 2:
        ap.error("--models must be at least 2")

    convert = str(REPO / "bench" / "convert.py")
    srcs = []
    for seed in range(args.models):  # generation in children: this process must stay small (see bench/convert.py)
        run_child([sys.executable, convert, "--_generate", "--preset", args.preset, "--cache-dir", str(args.cache_dir),
                   "--_seed", str(seed)])
        srcs.append(checkpoint_path(args.preset, args.cache_dir, seed))
    files = sorted(str(f) for s in srcs for f in s.glob("*.safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    one = total / args.models
    largest = largest_tensor_bytes(srcs[0])
    work = Path(tempfile.mkdtemp(prefix="soup-", dir=args.work_dir or args.cache_dir))
    load0 = os.getloadavg()[0]
    try:
        for s in srcs:
            drop_cache(s)
        read = run_child([sys.executable, convert, "--_read", *files])
        for s in srcs:
            drop_cache(s)
        soup = run_child([sys.executable, "-m", "launch.soup", "average", *map(str, srcs), "--dst", str(work / "soup"),
                          "--no-plot"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\npreset {args.preset}: {args.models} bf16 checkpoints of {one / GIB:.2f} GiB each (largest tensor "
          f"{largest / GIB:.2f} GiB); load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs)")
    print(f"{'step':<6} {'seconds':>8} {'GiB/s in':>9} {'CPU s':>7} {'peak RSS GiB':>13} {'RSS / model':>12} "
          f"{'RSS / (largest x N)':>20} {'throughput vs read':>19}")
    for step, (sec, rss, cpu) in (("read", read), ("soup", soup)):
        print(f"{step:<6} {sec:8.1f} {total / GIB / sec:9.2f} {cpu:7.1f} {rss / GIB:13.2f} {rss / one:12.2f} "
              f"{rss / (largest * args.models):20.2f} {read[0] / sec:18.2f}x")


if __name__ == "__main__":
    main()
