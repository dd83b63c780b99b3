"""`mm-profile`: read what a run recorded for profiling (`--config.profile.*`, see mm/profiling/capture.py).

    mm-profile summarize WORKDIR/profile [--aot REPORT.json] [--json OUT.json] [--png OUT.png] [--top 10]
    mm-profile collectives WORKDIR [--json OUT.json]

`summarize` reads every process's trace under the directory (through xprof: `pip install -e '.[profile]'`)
and prints, per process and overall, step time split into compute, collectives by kind and idle, host time
(input-pipeline wait, dispatch), the slowest process per step and its lag, and the top ops; it writes the same
as JSON and a PNG of per-process stacked bars per step (default: summary.json / summary.png in the directory).
With `--aot` (an `mm-aot --json` report; default WORKDIR/aot.json when present) it prints the compiler's
estimate next to the measured step time and MFU.
`collectives` lists the collectives of the step's optimised HLO that `--config.profile.dump_hlo=True` wrote
(kind, bytes, replica groups).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from launch import cli

_PROG = "mm-profile"


def _summarize(a: argparse.Namespace) -> int:
    from mm.profiling import expected, plot, summary, traces

    try:
        s = summary.summarize(a.profile_dir, a.top)
    except traces.TraceError as e:
        return cli.report(_PROG, e)
    workdir = Path(a.profile_dir).resolve().parent
    aot_path = Path(a.aot) if a.aot else workdir / "aot.json"
    if a.aot and not aot_path.exists():
        return cli.report(_PROG, f"--aot {aot_path}: no such file")
    report = json.loads(aot_path.read_text()) if aot_path.exists() else None
    s["expected_vs_measured"] = expected.compare(s, workdir, report)
    text = summary.format_text(s)
    if s["expected_vs_measured"]:
        text += "\n" + expected.format_text(s["expected_vs_measured"])
    out_json = Path(a.json or Path(a.profile_dir) / "summary.json")
    out_png = Path(a.png or Path(a.profile_dir) / "summary.png")
    out_json.write_text(json.dumps(s, indent=2, default=str))
    plot.step_bars(s, out_png)
    print(text)
    print(f"{_PROG}: wrote {out_json} and {out_png}")
    return 0


def _collectives(a: argparse.Namespace) -> int:
    from mm.profiling import hlo

    path = Path(a.workdir) / "hlo" / "train_step.optimized.txt"
    if not path.exists():
        return cli.report(_PROG, f"{path}: no HLO dump (run mm-train with --config.profile.dump_hlo=True)")
    ops = hlo.collective_ops(path.read_text())
    print(f"{path}: {len(ops)} collective op(s)\n{hlo.format_ops(ops)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"ops": ops, "totals": hlo.collectives_from(ops)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=_PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="summarise every process's traces under WORKDIR/profile")
    s.add_argument("profile_dir")
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--aot", default="", help="an mm-aot --json report for the same config and topology")
    s.add_argument("--json", default="", help="write the summary here (default PROFILE_DIR/summary.json)")
    s.add_argument("--png", default="", help="write the per-step plot here (default PROFILE_DIR/summary.png)")
    c = sub.add_parser("collectives", help="the collectives of WORKDIR/hlo/train_step.optimized.txt")
    c.add_argument("workdir")
    c.add_argument("--json", default="")
    a = ap.parse_args(argv)
    return _summarize(a) if a.cmd == "summarize" else _collectives(a)


if __name__ == "__main__":
    sys.exit(main())
