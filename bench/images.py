"""Images/s of decode + CATTY tiling + normalise: mm.data.images vs the transformers image-processor path.

Both sides do the same work per file and produce the same `[N, 3, 336, 336]` float32 tiles (checked):
- baseline: Pillow decode + `convert("RGB")`, the CATTY crops cut with Pillow, then transformers'
  `CLIPImageProcessorPil` (size 336, crop 336; the no-torchvision path) on the list of tiles, one process;
- ours: `load_image` (EXIF, mode conversion, checks) + CATTY + lookup-table normalisation, in one process,
  and on a process pool over all cores (`--workers`, default: all). Workers decode and cut the tiles and
  send them as uint8 (a quarter of the float32 bytes through the pipe); the parent normalises them, so the
  pool's output is the same float32 array the one-process path returns.

Run: `python bench/images.py [--images 48] [--dir DIR] [--workers N]`. Generates a folder of JPEG/PNG files of
mixed sizes and aspect ratios (kept in a temp dir unless --dir is given). Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm.data.images import Normalizer, ProcessorConfig, catty, cut_tiles, load_image  # noqa: E402
from mm.data.tiling import apply_plan, catty_plan  # noqa: E402

SIZES = [(1920, 1080), (800, 600), (1000, 1010), (3000, 300), (640, 480), (1280, 720), (500, 1500),
         (2048, 1536), (300, 300), (1024, 1024), (720, 1280), (2500, 800)]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Smooth gradients with noise, mixed sizes, alternating JPEG / PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, ((x + y) % 256)], -1) + rng.normal(0, 12, (h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        path = folder / (f"img{i:03d}.jpg" if i % 2 == 0 else f"img{i:03d}.png")
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path, compress_level=1)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ ours
_CFG = ProcessorConfig.clip(336)
_NORM = Normalizer(_CFG)


def ours_one(path: Path) -> np.ndarray:
    return catty(load_image(path), _CFG, normalizer=_NORM).pixel_values


def ours_worker(path: Path) -> np.ndarray:
    """Pool side: decode + CATTY crops, uint8 `[N, 336, 336, 3]`."""
    img = load_image(path)
    return cut_tiles(img, catty_plan(img.width, img.height))


# -------------------------------------------------------------------------------------- baseline
_HF = None


def _hf_processor():
    global _HF
    if _HF is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        _HF = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return _HF


def baseline_one(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    tiles = apply_plan(img, catty_plan(img.width, img.height))
    return _hf_processor()(images=tiles, return_tensors="np")["pixel_values"]


def timed(fn, paths, repeat: int) -> tuple[float, list[np.ndarray]]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [fn(p) for p in paths]
        best = min(best, time.perf_counter() - t0)
    return best, out


def timed_pool(pool: cf.Executor, paths, repeat: int) -> tuple[float, list[np.ndarray]]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [_NORM(tiles) for tiles in pool.map(ours_worker, paths)]
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the generated images (default: temp)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed passes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(args.dir or Path(tmp), args.images)
        _hf_processor()
        baseline_one(paths[0]), ours_one(paths[0])  # warm up both paths
        t_base, ref = timed(baseline_one, paths, args.repeat)
        t_one, got = timed(ours_one, paths, args.repeat)
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref))
        tiles = sum(len(r) for r in ref)
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            list(pool.map(ours_worker, paths[: args.workers]))  # start the workers outside the timing
            t_pool, got_pool = timed_pool(pool, paths, args.repeat)
        err = max(err, max(float(np.max(np.abs(a - b))) for a, b in zip(got_pool, ref)))

    n = len(paths)
    print(f"{n} images ({tiles} tiles of 336x336), cores: {os.cpu_count()}, max |ours - transformers| = {err:.2e}")
    print(f"transformers CLIPImageProcessorPil path (1 process): {n / t_base:8.2f} images/s")
    print(f"mm.data.images (1 process):                          {n / t_one:8.2f} images/s  "
          f"ratio {t_base / t_one:.2f}x")
    print(f"mm.data.images ({args.workers} worker processes):              {n / t_pool:8.2f} images/s  "
          f"ratio {t_base / t_pool:.2f}x")


if __name__ == "__main__":
    main()
