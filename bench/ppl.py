"""`mm-ppl score` throughput on 1 process against N local processes (jax.distributed, gloo) on the same rows.

    python bench/ppl.py --model MM_VLM_DIR --data rows.json --image-root DIR [--processes 2] [--batch-size 8]

e.g. after the soup run: `--model /tmp/mm-soups/start/export --data /tmp/mm-soups/data/shapes/train.json
--image-root /tmp/mm-soups/data/shapes/images`. Each configuration runs as fresh `mm-ppl score` processes into
its own output directory; samples/s counts scored rows over the wall time of the whole command (load and
compile included, as a user waits for it), and the merged scores of the two runs are compared row by row.
Prints both, the ratio, and the CPU count: on a machine with fewer cores than processes the ratio says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.local_cluster import free_port  # noqa: E402


def run(n: int, args: argparse.Namespace, out: Path) -> float:
    """Seconds of one `mm-ppl score` run over `n` processes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    base = [sys.executable, "-m", "launch.ppl", "score", "--model", args.model, "--data", args.data, "--out", str(out),
            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len)]
    base += ["--image-root", args.image_root] if args.image_root else []
    port = free_port()
    extra = [[] if n == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
             for i in range(n)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + e, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for e in extra]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"mm-ppl score ({n} processes) failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def _scores(out: Path) -> dict[int, float]:
    return {r["index"]: r["ppl"] for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())
            if "ppl" in r}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-root", default=None)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ppl-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t1 = run(1, args, one)
        tn = run(args.processes, args, many)
        s1, sn = _scores(one), _scores(many)
    if set(s1) != set(sn):
        raise SystemExit(f"the runs scored different rows: {len(s1)} vs {len(sn)}")
    diff = max(abs(s1[i] - sn[i]) / s1[i] for i in s1)
    rows = len(s1)
    print(f"\n{rows} rows scored; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"{'processes':>9} {'seconds':>8} {'samples/s':>10} {'vs 1 process':>13}")
    print(f"{1:>9} {t1:8.1f} {rows / t1:10.1f} {1.0:12.2f}x")
    print(f"{args.processes:>9} {tn:8.1f} {rows / tn:10.1f} {t1 / tn:12.2f}x")
    print(f"max relative PPL difference between the runs: {diff:.2e}")


if __name__ == "__main__":
    main()
