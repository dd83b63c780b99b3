"""`mm-bpo negatives`: BPO's self-made negatives (image weakening, error injection) paired with the dataset's
answers, for DPO (`data.kind=preference`).

  mm-bpo negatives --model MM_VLM_DIR --data rows.json --image-root DIR --out pairs.jsonl
                   [--methods noise,inject] [--t 900] [--seed 0] [--temperature 0.8 --top-p 0.95]
                   [--inject-temperature 0.8 --inject-top-p 0.95] [--max-new-tokens 64] [--max-words 350]
                   [--batch-size 8] [--chunk-rows 64] [--coordinator host:port --num-processes N --process-id I]

  mm-bpo evaluate --model MM_VLM_DIR [--reference MM_VLM_DIR] --pairs pairs.jsonl --image-root DIR
                  [--beta 0.1] [--workflow mm] [--batch-size 16] [--out metrics.json]

Work files (resumable chunks, `summary.json` with kept / dropped / skipped counts) go to `pairs.jsonl.parts/`;
run the same command again to continue an interrupted run. `mm.bpo` documents the pairs' format. `evaluate`
prints the held-out preference metrics of `mm.preference_eval` (TRL's reward metrics against the reference -
by default the model itself - and the model's own log-prob preference). Bad input exits with status 2 and one
line naming the flag or file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-bpo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    n = sub.add_parser("negatives", help="make preference pairs from a LLaVA JSON file; resumable")
    n.add_argument("--model", required=True, help="mm VLM dir (IAA or LLaVA-style) with its tokenizer")
    n.add_argument("--data", required=True, help="LLaVA JSON / JSONL rows (one image each)")
    n.add_argument("--image-root", required=True, help="directory the rows' image paths are relative to")
    n.add_argument("--out", required=True, help="pairs JSONL to write")
    n.add_argument("--methods", default="noise,inject", help="comma-separated: noise (image weakening), inject")
    n.add_argument("--t", type=int, default=900, help="diffusion step of the image weakening (of 1000)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--temperature", type=float, default=0.8, help="sampling of answers from weakened images")
    n.add_argument("--top-p", type=float, default=0.95)
    n.add_argument("--inject-temperature", type=float, default=0.8, help="sampling of the error-injection rewrite")
    n.add_argument("--inject-top-p", type=float, default=0.95)
    n.add_argument("--max-new-tokens", type=int, default=64)
    n.add_argument("--max-words", type=int, default=350, help="drop pairs with a longer response")
    n.add_argument("--batch-size", type=int, default=8)
    n.add_argument("--chunk-rows", type=int, default=64, help="rows per resumable chunk")
    cli.add_process_flags(n)
    e = sub.add_parser("evaluate", help="held-out preference metrics of a model (against a reference) on pairs")
    e.add_argument("--model", required=True, help="mm VLM dir: the policy")
    e.add_argument("--reference", default=None, help="mm VLM dir of the reference (default: --model itself)")
    e.add_argument("--pairs", required=True, help="preference rows (JSON / JSONL), e.g. from mm-bpo negatives")
    e.add_argument("--image-root", required=True)
    e.add_argument("--beta", type=float, default=0.1)
    e.add_argument("--workflow", default="mm", help="the IAA workflow that answers (mm)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", default=None, help="write the metrics here as JSON too")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from launch.cli import require_paths

    require_paths(model=args.model, reference=args.reference, pairs=args.pairs, image_root=args.image_root)
    from mm import preference_eval

    m = preference_eval.evaluate(args.model, args.reference or args.model, args.pairs, image_root=args.image_root,
                                 beta=args.beta, workflow=args.workflow, batch_size=args.batch_size)
    text = json.dumps(m, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _negatives(args: argparse.Namespace) -> int:
    from launch.cli import require_paths

    require_paths(model=args.model, data=args.data, image_root=args.image_root)
    from mm import bpo, sharding

    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    s = bpo.negatives(args.model, args.data, image_root=args.image_root, out=args.out,
                      methods=[m for m in args.methods.split(",") if m], t=args.t, seed=args.seed,
                      temperature=args.temperature, top_p=args.top_p, inject_temperature=args.inject_temperature,
                      inject_top_p=args.inject_top_p, max_new_tokens=args.max_new_tokens, max_words=args.max_words,
                      batch_size=args.batch_size, chunk_rows=args.chunk_rows)
    if not s["complete"]:
        print(f"mm-bpo: {s['done']} of {s['rows']} rows done; other shards are unfinished: run every process again")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    return cli.run("mm-bpo", {"negatives": _negatives, "evaluate": _evaluate}[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
