"""`mm-eval`: benchmarks in their published formats, scored by mm itself, and the base-vs-IAA comparison.

  mm-eval run {mme,mmbench,pope,refcoco} --model DIR --data FILE_OR_DIR [--image-root DIR] --out OUTDIR
              [--workflow mm|g] [--batch-size 8] [--max-new-tokens N] [--tiling square|catty] [--limit N]
              [--coordinator host:port --num-processes N --process-id I]
  mm-eval compare --base LLM_DIR --model IAA_DIR --tasks T1,T2 [--vlm-tasks BENCH=DATA[@IMAGE_ROOT],...]
              [--include-path DIR] --out OUTDIR [--limit N] [--batch-size 8]
  mm-eval lm-eval ARGS...    lm-evaluation-harness's own command line with the model `mm` registered
                             (`mm-eval lm-eval --model mm --model_args path=DIR,workflow=text --tasks ...`)

`run` writes per-sample records, `summary.json`, `report.md` and `report.png` in OUTDIR (`mm.eval.runner`);
run it again with the same flags to finish an interrupted run; with several processes process I answers
items I::N. `compare` needs the `eval` extra (lm-eval). Bad input exits with status 2 and one line naming the
flag or file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch import cli

def build_parser() -> argparse.ArgumentParser:
    from mm.eval.catalog import NAMES

    p = argparse.ArgumentParser(prog="mm-eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer and score one benchmark; resumable")
    r.add_argument("benchmark", choices=NAMES)
    r.add_argument("--model", required=True, help="mm VLM dir (IAA or LLaVA-style) or HF Llava dir")
    r.add_argument("--data", required=True, help="the benchmark's file(s) in its published format (mm.eval.<name>)")
    r.add_argument("--image-root", default=None, help="directory the items' image paths are relative to")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--workflow", default=None, help="IAA branch (default: g for refcoco when present, else mm)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's")
    r.add_argument("--template", default="chat", choices=("chat", "plain"))
    r.add_argument("--tiling", default="square", choices=("square", "catty"))
    r.add_argument("--dtype", default=None)
    r.add_argument("--local-devices", type=int, default=1, help="data-parallel over this many local devices (-1 all)")
    r.add_argument("--chunk-rows", type=int, default=64, help="items per chunk file")
    r.add_argument("--limit", type=int, default=None, help="the first N items only")
    cli.add_process_flags(r)
    c = sub.add_parser("compare", help="base LLM vs IAA text workflow on lm-eval tasks (+ VLM tasks), one report")
    c.add_argument("--base", required=True, help="the base LLM dir (HF or mm)")
    c.add_argument("--model", required=True, help="the IAA VLM dir built on it")
    c.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    c.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    c.add_argument("--vlm-tasks", default="", help="BENCH=DATA[@IMAGE_ROOT],... run with `mm-eval run`")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--limit", type=int, default=None, help="items per task")
    c.add_argument("--batch-size", type=int, default=8)
    sub.add_parser("lm-eval", help="lm-evaluation-harness's command line with the `mm` model registered",
                   add_help=False)
    return p


def _run(args: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(model=args.model, data=args.data, image_root=args.image_root)
    from mm import sharding
    from mm.eval import runner

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    summary = runner.run(args.benchmark, args.model, args.data, out_dir=args.out, image_root=args.image_root,
                         workflow=args.workflow, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         template=args.template, tiling=args.tiling, dtype=args.dtype,
                         local_devices=args.local_devices, chunk_rows=args.chunk_rows, limit=args.limit)
    if summary is None:
        print("mm-eval: other shards are unfinished: run every process again to finish", flush=True)
    return 0


def _need_harness(module: str, what: str) -> None:
    import importlib.util

    from mm.config import ConfigError

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module} (the eval extra: docs/evaluation.md, 'Installing the harnesses')")


def _compare(args: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(base=args.base, model=args.model, include_path=args.include_path)
    _need_harness("lm_eval", "mm-eval compare")
    from mm.eval import compare

    vlm = compare.parse_vlm_tasks(args.vlm_tasks)
    res = compare.compare(args.base, args.model, [t for t in args.tasks.split(",") if t], out_dir=args.out,
                          include_path=args.include_path, vlm_tasks=vlm, limit=args.limit,
                          batch_size=args.batch_size)
    print(f"mm-eval compare: text workflow {'IDENTICAL to' if res['identical'] else 'DIFFERS from'} the base "
          f"on {len(res['text'])} metrics; wrote {res['report']}", flush=True)
    return 0 if res["identical"] else 1


def _lm_eval(argv: Sequence[str]) -> int:
    _need_harness("lm_eval", "mm-eval lm-eval")
    from mm.eval import harness_lm

    return harness_lm.cli(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    if argv[:1] == ["lm-eval"]:
        return cli.run("mm-eval", _lm_eval, argv[1:])
    args = build_parser().parse_args(argv)

    return cli.run("mm-eval", _run if args.command == "run" else _compare, args)


if __name__ == "__main__":
    sys.exit(main())
