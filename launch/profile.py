"""`mm-profile summarize TRACE_DIR`: step time split into compute / collectives / idle and the top ops.

TRACE_DIR is what `--config.profile.steps=[a,b]` wrote (`<workdir>/profile`, one subdirectory per process);
every trace found under it is summarised. The same traces open in TensorBoard's profile plugin / xprof.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mm-profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="summarise the traces under a directory")
    s.add_argument("trace_dir")
    s.add_argument("--top", type=int, default=10)
    a = ap.parse_args(argv)
    from mm.train.profile_summary import find_traces, format_summary, summarize_trace

    traces = find_traces(a.trace_dir)
    if not traces:
        from launch import cli

        return cli.report("mm-profile", f"no *.trace.json.gz under {a.trace_dir}")
    for t in traces:
        print(format_summary(summarize_trace(t, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
