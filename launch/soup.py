"""`mm-soup`: average, maximum or greedy model soups of mm checkpoints, finished mm-train workdirs or HF checkpoints.

  mm-soup average INPUT... --dst OUT [SCORING] [--dtype keep|float32|bfloat16|float16]
  mm-soup maximum INPUT... --dst OUT SCORING --top-p K
  mm-soup greedy  INPUT... --dst OUT SCORING --accept ge|gt
  SCORING: --score loss|exact-match --split VAL.json [--image-root DIR] [--workflow mm|text]
       or: --scorer module:function

`--score` is a built-in evaluator on the named LLaVA JSON split (`mm.heldout`: minus the mean answer-token NLL,
or the exact-match accuracy of greedy answers; a split named like a test split is refused); `--scorer` names
your own function `score(checkpoint_dir) -> float` (higher is better) on a held-out split, never the test split.
Greedy's comparison is explicit: `ge` keeps an ingredient when the soup's score
does not drop (POINTS), `gt` only when it rises (the model-soups paper). Tensors stream one at a time,
accumulated in float32; `OUT` gets the soup plus `soup_report.json` / `soup_report.png`, and nothing partial on
failure. Bad input exits with status 2 and one line naming the flag, file or tensor at fault.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    from mm.checkpoints.engine import DTYPES
    from mm.heldout import SCORES
    from mm.soup import ACCEPT, METHODS

    p = argparse.ArgumentParser(prog="mm-soup", description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=METHODS, help="which soup")
    p.add_argument("inputs", nargs="+", help="ingredient directories: mm checkpoints and mm-train workdirs (exported "
                   "first), or HF checkpoints")
    p.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--scorer", default=None, help="module:function scoring a checkpoint dir (higher is better)")
    p.add_argument("--score", choices=SCORES, default=None, help="a built-in scorer on --split (mm.heldout)")
    p.add_argument("--split", default=None, help="--score: the held-out LLaVA JSON split (never the test split)")
    p.add_argument("--image-root", default=None, help="--score: where the split's image paths are resolved")
    p.add_argument("--workflow", default="mm", help="--score: the IAA workflow to evaluate (mm or text)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--score exact-match: answer length limit")
    p.add_argument("--top-p", type=int, default=None, help="maximum: how many of the best ingredients to average")
    p.add_argument("--accept", choices=ACCEPT, default=None,
                   help="greedy: ge (>=, POINTS) or gt (>, model-soups paper); required for greedy")
    p.add_argument("--dtype", default="keep", choices=DTYPES, help="dtype of the soup; 'keep' keeps the inputs'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.add_argument("--no-plot", action="store_true", help="no soup_report.png")
    return p


def _scorer(args: argparse.Namespace):
    from mm.config import ConfigError

    if args.score is None:
        for flag in ("split", "image_root"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} is for --score (a built-in scorer)")
        return args.scorer
    if args.scorer is not None:
        raise ConfigError("--score and --scorer: choose one")
    if args.split is None:
        raise ConfigError(f"--score {args.score} needs --split (a held-out LLaVA JSON split, never the test split)")
    from mm.heldout import make_scorer

    return make_scorer(args.score, args.split, image_root=args.image_root, workflow=args.workflow,
                       max_new_tokens=args.max_new_tokens)


def _soup(args: argparse.Namespace) -> int:
    from mm.soup import soup

    sel = soup(args.inputs, args.dst, method=args.method, scorer=_scorer(args), top_p=args.top_p, accept=args.accept,
               dtype=args.dtype, overwrite=args.overwrite, plot=not args.no_plot)
    score = "" if sel.score is None else f", score {sel.score:.6g}"
    print(f"wrote {args.dst}: {args.method} soup of {len(sel.members)} of {len(args.inputs)} ingredients{score}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from launch import cli

    return cli.run("mm-soup", _soup, args)


if __name__ == "__main__":
    sys.exit(main())
