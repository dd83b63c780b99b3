"""`mm-ppl`: perplexity scoring of LLaVA-style data under a trained mm VLM, and filtering by it (POINTS).

  mm-ppl score  --model DIR --data rows.json [--image-root DIR] --out OUTDIR [--batch-size 8] [--max-len 2048]
                [--template chat|plain] [--tiling square|catty] [--workflow mm] [--local-devices 1]
                [--coordinator host:port --num-processes N --process-id I]
  mm-ppl filter --data rows.json --scores OUTDIR/scores.jsonl (--keep 0.2 | --max-ppl X) --out kept.json

`score` writes chunks, a merged `OUTDIR/scores.jsonl` and `summary.json` (`mm.ppl` describes the format); run it
again with the same flags to finish an interrupted run. With several processes (one per host, or local ones
joined by `--coordinator`) process I scores rows I::N. `filter` keeps the lowest-PPL fraction (or every row
up to a PPL) in the data's own order and format, and writes `kept.ppl_hist.png`. Bad input exits with status 2
and one line naming the flag or file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-ppl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score every row; resumable")
    s.add_argument("--model", required=True, help="mm VLM dir (IAA or LLaVA-style) or HF Llava dir")
    s.add_argument("--data", required=True, help="LLaVA JSON / JSONL file or ArrayRecord dir")
    s.add_argument("--image-root", default=None, help="directory the rows' image paths are relative to")
    s.add_argument("--out", required=True, help="output directory (chunks, scores.jsonl, summary.json)")
    s.add_argument("--batch-size", type=int, default=8, help="packed rows per forward")
    s.add_argument("--max-len", type=int, default=2048, help="tokens per packed row (longer examples are truncated)")
    s.add_argument("--template", default="chat", choices=("chat", "plain"), help="the training template")
    s.add_argument("--tiling", default="square", choices=("square", "catty"), help="the training image tiling")
    s.add_argument("--workflow", default="mm", help="IAA branch to score with (mm, g, text)")
    s.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    s.add_argument("--local-devices", type=int, default=1, help="data-parallel over this many local devices (-1 all)")
    s.add_argument("--chunk-rows", type=int, default=512, help="rows per chunk file")
    cli.add_process_flags(s)
    f = sub.add_parser("filter", help="keep the lowest-PPL rows")
    f.add_argument("--data", required=True, help="the scored JSON list / JSONL file")
    f.add_argument("--scores", required=True, help="scores.jsonl (or the score --out dir)")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=float, help="fraction of scored rows to keep (lowest PPL, ties by row index)")
    g.add_argument("--max-ppl", type=float, help="keep rows with PPL <= this")
    f.add_argument("--out", required=True, help="kept rows, same format as --data")
    f.add_argument("--histogram", default=None, help="PNG path (default: next to --out)")
    return p


def _score(args: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(model=args.model, data=args.data, image_root=args.image_root)
    from mm import ppl, sharding

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    res = ppl.score(args.model, args.data, image_root=args.image_root, out_dir=args.out, batch_size=args.batch_size,
                    max_len=args.max_len, template=args.template, tiling=args.tiling, workflow=args.workflow,
                    dtype=args.dtype, local_devices=args.local_devices, chunk_rows=args.chunk_rows)
    if not res.complete:
        print(f"mm-ppl: {len(res.rows) + len(res.skipped)} of {res.total} rows have a record; other shards are "
              "unfinished: run every process again to finish", flush=True)
    return 0


def _filter(args: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(data=args.data, scores=args.scores)
    from mm import ppl

    rep = ppl.filter_rows(args.data, args.scores, keep=args.keep, max_ppl=args.max_ppl, out=args.out,
                          histogram=args.histogram)
    cut = "none" if rep["threshold"] is None else f"{rep['threshold']:.6g}"
    print(f"mm-ppl: kept {rep['kept']} of {rep['scored']} scored rows ({rep['unscored']} of {rep['rows']} rows "
          f"had no score), PPL cut {cut}; wrote {rep['out']} and {rep['histogram']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    return cli.run("mm-ppl", _score if args.command == "score" else _filter, args)


if __name__ == "__main__":
    sys.exit(main())
