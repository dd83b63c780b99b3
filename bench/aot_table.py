"""Which release recipes fit which TPU slices: `mm-aot` over configs x topologies x meshes, each with the cheapest
remat policy that fits.

    python bench/aot_table.py [--out DIR] [--only iaa14] [--topologies v5p-8,v5p-64,v5e-256]

For each run (IAA-14 stage 2 and LLaVA stage 2 on Llama-3-8B shapes with the CLIP ViT-L/14-336 tower, the presets'
batch of 128 packed rows x 2048 tokens), each topology and each mesh (`fsdp`: every device on the fsdp axis;
`fsdp x tensor`: tensor 4, the chips of one host, fsdp the rest), the step is compiled by the XLA TPU compiler on
this CPU host (the `tpu` extra, `pip install -e '.[tpu]'`) with remat policies from the least recompute to the
most (`dots_no_batch`, the presets' choice, then `full`); when even `full` does not fit, with gradient
accumulation (`optim.grad_accum` 4, then 16). Printed: a markdown table (per-device GiB of the first setting that
fits, against the chip's HBM, or XLA's refusal); DIR/aot_table.json keeps every attempt. Each compile is its own
`mm-aot` process (a refused compile can leave the TPU compiler's memory behind).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"iaa14": "configs/iaa.py:stage2,iaa14_llama3_8b", "llava": "configs/llava.py:stage2,llama3_8b"}
MESHES = {"fsdp": dict(data=1, fsdp=-1, tensor=1), "fsdp x tensor": dict(data=1, fsdp=-1, tensor=4)}
ATTEMPTS = [dict(remat="dots_no_batch", accum=1), dict(remat="full", accum=1), dict(remat="full", accum=4),
            dict(remat="full", accum=16)]
GIB = 1024 ** 3


def compile_one(config: str, topology: str, mesh: dict, remat: str, accum: int, out: Path) -> dict:
    js = out / f"{abs(hash((config, topology, str(mesh), remat, accum)))}.json"
    args = [sys.executable, "-m", "launch.aot", f"--config={config}", f"--topology={topology}",
            f"--config.model.llm.remat_policy={remat}", f"--config.optim.grad_accum={accum}", f"--json={js}"]
    args += [f"--config.mesh.{k}={v}" for k, v in mesh.items()]
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t0
    if r.returncode not in (0, 3) or not js.exists():
        return {"fits": None, "error": (r.stderr.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    rep = json.loads(js.read_text())
    rep["seconds"] = seconds
    return rep


def cell(rep: dict, remat: str, accum: int) -> str:
    if rep.get("fits") is None:  # mm-aot refused the config before compiling (exit 2), or failed
        msg = rep["error"].removeprefix("mm-aot: error: ").split(" (mesh ")[0]
        return f"n/a: {msg}"
    setting = remat + (f", accum {accum}" if accum > 1 else "")
    if "memory" not in rep:  # refused by the compiler
        return f"no ({rep['compiler'][:70]})"
    m = rep["memory"]
    return f"{m['total'] / GIB:.1f} / {rep['hbm'] / GIB:.0f} GiB, {setting}" + ("" if rep["fits"] else " (no)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/aot_table")
    ap.add_argument("--only", default="", help="comma list of runs: " + ",".join(RUNS))
    ap.add_argument("--topologies", default="v5p-8,v5p-64,v5e-256")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {k: v for k, v in RUNS.items() if not a.only or k in a.only.split(",")}
    tops = a.topologies.split(",")
    rows, every = [], []
    total = len(runs) * len(tops) * len(MESHES)
    t_start, done = time.perf_counter(), 0
    for run, config in runs.items():
        for top in tops:
            for mesh_name, mesh in MESHES.items():
                chosen = None
                for at in ATTEMPTS:
                    rep = compile_one(config, top, mesh, at["remat"], at["accum"], out)
                    every.append({"run": run, "topology": top, "mesh": mesh_name, **at, "report": rep})
                    sys.stderr.write(f"  {run} {top} {mesh_name} {at['remat']} accum {at['accum']}: "
                                     f"{cell(rep, at['remat'], at['accum'])} ({rep['seconds']:.0f} s)\n")
                    chosen = (rep, at)
                    if rep.get("fits") is not False:  # fits, or an error no other setting will fix
                        break
                done += 1
                el = time.perf_counter() - t_start
                sys.stderr.write(f"[{done}/{total}] {el:.0f} s, ETA {el / done * (total - done):.0f} s\n")
                rows.append((run, top, mesh_name, cell(chosen[0], chosen[1]["remat"], chosen[1]["accum"])))
                (out / "aot_table.json").write_text(json.dumps(every, indent=1))
    print("| run | topology | mesh | per-device total / HBM, first setting that fits |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
