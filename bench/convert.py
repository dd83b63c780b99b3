"""Converter benchmark: peak RSS and throughput of `mm-convert` against a plain sequential read of the same files.

    python bench/convert.py --preset 1b            # tiny | 1b | 8b
    python bench/convert.py --preset 8b --cache-dir /big/disk/mm-bench
    python bench/convert.py --preset 8b --family iaa --drop-source   # an IAA-14 + G release (~33 GiB)

Once per preset it writes (into `--cache-dir`, default ~/.cache/mm-bench, never the repo) a random bf16
HF checkpoint with the exact tensor shapes of the preset (8b = Llama-3-8B: 32 layers, d 4096, FFN 14336,
32/8 heads, vocab 128256, untied; 1b = Llama-3.2-1B: 16 layers, d 2048, FFN 8192, 32/8 heads, tied),
streaming random bytes into 5 GB shards. `--family iaa` writes the preset's LLM as an IAA release instead
(DESIGN.md section 2 names): the base, branches "mm" and "g" with 14 insertion layers each at IAA-14's
positions, their MLP projectors (1024 -> d), and a CLIP ViT-L/14-336 tower inside the checkpoint; hf-to-mm
then writes an mm "vlm" directory and mm-to-hf the release layout with its tower in `vision_tower/`. Then, each step in
its own subprocess so its peak RSS is its own
(`os.wait4` rusage of that child):
  read      read every byte of the safetensors files sequentially (the baseline),
  hf-to-mm  `mm-convert hf-to-mm --dtype keep`,
  mm-to-hf  `mm-convert mm-to-hf --dtype keep` (optional, `--skip-export`).
The orchestrating process stays small (it only spawns children): a child's `ru_maxrss` would otherwise
start from the parent's high-water mark, which the kernel carries across exec.
Before each step our own files are dropped from the page cache (`posix_fadvise(DONTNEED)`, no root needed) so
every step reads from disk. Prints seconds, GiB/s, CPU seconds, peak RSS, throughput ratios convert/read and
the load average (on a shared machine the CPU-bound convert steps slow down far more than the plain read). Targets for
8b: hf-to-mm peak RSS < 3 GiB and ratio >= 0.5. Outputs are deleted afterwards; the cache is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Presets as LLMConfig keyword arguments (mm is imported lazily so the read baseline child stays bare).
PRESETS = {
    "tiny": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                 num_kv_heads=2, head_dim=64, rope_theta=500000.0),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
               bos_token_id=128000, eos_token_id=(128001,)),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
               bos_token_id=128000, eos_token_id=(128001,)),
}
GIB = 1024**3
_DONE = ".complete"


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bits with the top exponent bit cleared: finite bf16 values of magnitude < 2, generated fast."""
    import ml_dtypes

    n = int(np.prod(shape))
    bits = rng.integers(0, 2**16, size=n, dtype=np.uint16) & np.uint16(0xBFFF)
    return bits.view(ml_dtypes.bfloat16).reshape(shape)


def checkpoint_path(preset: str, cache_dir: Path, seed: int = 0, family: str = "llm") -> Path:
    name = f"hf-{preset}-bf16" if family == "llm" else f"hf-{preset}-{family}-bf16"
    return cache_dir / (name + (f"-seed{seed}" if seed else ""))


def _iaa_release(config: object) -> tuple[list, dict]:
    """Entries and config.json of an IAA-14 + G release around `config` with a CLIP ViT-L/14-336 tower (an LLM
of fewer than 32 layers gets insertion layers at its first min(14, layers) positions)."""
    from mm.config import VisionConfig
    from mm.convert.hf_vision import vision_entries
    from mm.convert.iaa_release import RELEASE_VISION_PREFIX, release_hf_config, release_name_map
    from mm.config import ProjectorConfig
    from mm.config import IAA_14, BranchConfig, IAAConfig

    tower = VisionConfig(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_layers=24,
                         num_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    proj = ProjectorConfig(kind="mlp2x_gelu", in_dim=tower.hidden_size, out_dim=config.hidden_size)
    pos = IAA_14 if config.num_layers > max(IAA_14) else tuple(range(min(len(IAA_14), config.num_layers)))
    iaa = IAAConfig(llm=config, branches=(BranchConfig("mm", pos, proj), BranchConfig("g", pos, proj)))
    entries = list(release_name_map(iaa).entries) + vision_entries(tower, RELEASE_VISION_PREFIX)
    hf = release_hf_config(iaa, "openai/clip-vit-large-patch14-336", torch_dtype="bfloat16")
    return entries, hf


def make_checkpoint(preset: str, cache_dir: Path, seed: int = 0, family: str = "llm") -> Path:
    """The cached random checkpoint of `preset` drawn from `seed` (generated on first use)."""
    path = checkpoint_path(preset, cache_dir, seed, family)
    if (path / _DONE).exists():
        return path
    import ml_dtypes

    from mm.checkpoints.safetensors_io import PlannedTensor, ShardedSafetensorsWriter
    from mm.config import LLMConfig
    from mm.convert.llm_family import llm_entries

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = LLMConfig(**PRESETS[preset])
    entries, hf_config = (llm_entries(config), config.to_hf_dict(torch_dtype="bfloat16")) if family == "llm" \
        else _iaa_release(config)
    plan = [PlannedTensor(e.hf_name, e.hf_shape, np.dtype(ml_dtypes.bfloat16)) for e in entries]
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    writer = ShardedSafetensorsWriter(path, plan, max_shard_bytes=5 * 10**9)
    for p in plan:
        writer.write(p.name, random_bf16(p.shape, rng))
    writer.close()
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    (path / _DONE).write_text("")
    total = sum(p.nbytes for p in plan)
    print(f"generated {path} ({total / GIB:.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def drop_cache(root: Path) -> None:
    """Evicts our own files from the page cache so the next step reads from disk."""
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(args: list[str]) -> tuple[float, int, float]:
    """Runs a subprocess; returns (seconds, peak RSS in bytes, CPU seconds) of that child alone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{args[:4]}... failed with status {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # Linux reports ru_maxrss in KiB


def largest_tensor(paths: list[str]) -> int:
    """Bytes of the largest tensor in the safetensors files (from their headers)."""
    import struct

    best = 0
    for p in paths:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        best = max([best] + [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                             if k != "__metadata__"])
    return best


def read_all(paths: list[str]) -> None:
    """The baseline: read every byte, sequentially, in 16 MiB chunks."""
    buf = bytearray(16 * 1024**2)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/mm-bench").expanduser())
    ap.add_argument("--work-dir", type=Path, default=None, help="where outputs go (default: inside --cache-dir)")
    ap.add_argument("--skip-export", action="store_true", help="do not time mm-to-hf")
    ap.add_argument("--family", choices=("llm", "iaa"), default="llm",
                    help="llm: the preset's HF causal LM; iaa: an IAA-14 + G release around it (with a CLIP tower)")
    ap.add_argument("--drop-source", action="store_true",
                    help="delete the cached checkpoint after hf-to-mm (disk: source, mm dir and export at once "
                         "need 3x its size)")
    ap.add_argument("--_read", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._read:
        read_all(args._read)
        return
    if args._generate:
        make_checkpoint(args.preset, args.cache_dir, args._seed, args.family)
        return

    # Generation runs in a child too: this process must stay small, since a child's ru_maxrss starts from
    # its parent's high-water mark at exec time.
    run_child([sys.executable, __file__, "--_generate", "--preset", args.preset, "--cache-dir", str(args.cache_dir),
               "--family", args.family])
    src = checkpoint_path(args.preset, args.cache_dir, family=args.family)
    files = sorted(str(f) for f in src.glob("*.safetensors"))
    nbytes = sum(os.path.getsize(f) for f in files)
    largest = largest_tensor(files)
    work = Path(tempfile.mkdtemp(prefix="convert-", dir=args.work_dir or args.cache_dir))
    results = {}
    load0 = os.getloadavg()[0]
    try:
        drop_cache(src)
        results["read"] = run_child([sys.executable, __file__, "--_read", *files])
        drop_cache(src)
        mm = work / "mm"
        extra = [] if args.family == "llm" or PRESETS[args.preset]["num_layers"] >= 32 else \
            ["--positions", ",".join(map(str, range(min(14, PRESETS[args.preset]["num_layers"]))))]
        results["hf-to-mm"] = run_child([sys.executable, "-m", "launch.convert", "hf-to-mm", "--src", str(src),
                                         "--dst", str(mm), "--dtype", "keep", "--no-progress", *extra])
        if args.drop_source:
            shutil.rmtree(src)
        if not args.skip_export:
            drop_cache(mm)
            results["mm-to-hf"] = run_child([sys.executable, "-m", "launch.convert", "mm-to-hf", "--src", str(mm),
                                             "--dst", str(work / "hf"), "--dtype", "keep", "--no-progress"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\npreset {args.preset} ({args.family}): {nbytes / GIB:.2f} GiB of bf16 safetensors in {len(files)} "
          f"file(s); "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs); largest tensor "
          f"{largest / GIB:.2f} GiB")
    print(f"{'step':<10} {'seconds':>8} {'GiB/s':>7} {'CPU s':>7} {'peak RSS GiB':>13} {'throughput vs read':>19}")
    read_s = results["read"][0]
    for step, (sec, rss, cpu) in results.items():
        print(f"{step:<10} {sec:8.1f} {nbytes / GIB / sec:7.2f} {cpu:7.1f} {rss / GIB:13.2f} {read_s / sec:18.2f}x")
    if args.preset == "8b":
        sec, rss, _ = results["hf-to-mm"]
        print(f"targets (8b hf-to-mm): peak RSS {rss / GIB:.2f} < 3 GiB: {rss < 3 * GIB}; "
              f"throughput {read_s / sec:.2f} >= 0.5x read: {read_s / sec >= 0.5}")


if __name__ == "__main__":
    main()
