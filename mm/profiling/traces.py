"""The trace files of a run's processes, read through xprof.

`--config.profile.steps=[a,b]` makes every process write its own `jax.profiler` session under
`WORKDIR/profile/process_<i>/plugins/profile/<time>/<host>.xplane.pb` (the XSpace protobuf that TensorBoard's
profile plugin / xprof open). `sessions(profile_dir)` finds them per process; `events(xplane)` converts one to
Chrome trace events with xprof's own converter (`xprof.convert.raw_to_tool_data`, the `profile` extra), the
same events its trace viewer shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_PROCESS = re.compile(r"^process_(\d+)$")


class TraceError(ValueError):
    """A profile directory without traces, or a trace xprof cannot read; names the path."""


def sessions(profile_dir: str | Path) -> dict[int, list[Path]]:
    """{process index: its `.xplane.pb` files, oldest first}. A directory that is itself one process's (no
    `process_<i>` below it) counts as process 0."""
    root = Path(profile_dir)
    if not root.is_dir():
        raise TraceError(f"{root}: no such directory (expected WORKDIR/profile from --config.profile.steps)")
    out: dict[int, list[Path]] = {}
    for d in sorted(root.iterdir()):
        m = _PROCESS.match(d.name)
        if m and d.is_dir():
            files = sorted(d.rglob("*.xplane.pb"))
            if files:
                out[int(m.group(1))] = files
    if not out:
        files = sorted(root.rglob("*.xplane.pb"))
        if files:
            out[0] = files
    if not out:
        raise TraceError(f"{root}: no *.xplane.pb under it (was the run started with --config.profile.steps?)")
    return out


def events(xplane: str | Path) -> list[dict[str, Any]]:
    """The trace events of one session (xprof's trace viewer conversion)."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError as e:
        raise TraceError(f"{xplane}: reading traces needs xprof: pip install -e '.[profile]'") from e
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(xplane)], "trace_viewer", {})
    if not data:
        raise TraceError(f"{xplane}: xprof could not convert this trace")
    parsed = json.loads(data)
    return parsed["traceEvents"] if isinstance(parsed, dict) else parsed
