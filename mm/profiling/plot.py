"""The summary as a PNG: per step, one stacked bar a process (compute, each collective kind, idle with the part
spent waiting for the input pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm.profiling.summary import COLLECTIVE_KINDS

_COLORS = {"compute": "#4c72b0", "all-gather": "#dd8452", "reduce-scatter": "#c44e52", "all-reduce": "#8172b3",
           "all-to-all": "#937860", "collective-permute": "#da8bc3", "send/recv": "#8c8c8c",
           "idle: input wait": "#f0c05a", "idle": "#cccccc"}


def step_bars(s: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = sorted(s["processes"])
    steps = s["steps"] or sorted({n for v in s["processes"].values() for n in v["steps"]})
    width = 0.8 / max(len(procs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(steps) * max(len(procs), 1)), 4.5))
    seen = set()
    for i, n in enumerate(steps):
        for j, p in enumerate(procs):
            row = s["processes"][p]["steps"].get(n)
            if row is None:
                continue
            x = i + (j - (len(procs) - 1) / 2) * width
            wait = min(row["data_us"], row["idle_us"])  # the host waiting for data while the devices idle
            parts = ([("compute", row["compute_us"])]
                     + [(k, row["collectives_us"].get(k, 0.0)) for k in COLLECTIVE_KINDS]
                     + [("idle: input wait", wait), ("idle", row["idle_us"] - wait)])
            bottom = 0.0
            for name, us in parts:
                if us <= 0:
                    continue
                ax.bar(x, us / 1e3, width * 0.9, bottom=bottom, color=_COLORS[name],
                       label=name if name not in seen else None)
                seen.add(name)
                bottom += us / 1e3
            ax.text(x, bottom, f"p{p}", ha="center", va="bottom", fontsize=7)
    slow = {r["step"]: r for r in s.get("per_step", [])}
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([f"step {n}" + (f"\nslowest p{slow[n]['slowest']} +{slow[n]['lag_us'] / 1e3:.1f} ms"
                                       if n in slow and len(procs) > 1 else "") for n in steps], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"{len(procs)} process(es): step time by kind")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
