"""The Markdown + PNG report of a summary (`{"metrics": {...}, "tables": {title: [row dicts]}}`): the headline
metrics, each table, and a bar chart of one column of one table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from mm.paths import write_atomic


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[dict[str, Any]], column: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = next(iter(rows[0])) if rows else ""
    names = [str(r[label]) for r in rows]
    values = [float(r[column]) if r.get(column) is not None else float("nan") for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [0 if math.isnan(v) else v for v in values], color="tab:blue")
    many = len(rows) > 4
    ax.set_xticks(range(len(rows)), names, rotation=30 if many else 0, ha="right" if many else "center")
    for i, v in enumerate(values):
        ax.text(i, 0 if math.isnan(v) else v, fmt(v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(column)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(summary: dict[str, Any], out_dir: str | Path, title: str, chart: tuple[str, str]) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.png for `summary`; returns their paths."""
    out = Path(out_dir)
    md, png = out / "report.md", out / "report.png"
    parts = [f"# {title}\n", markdown_table([{"metric": k, "value": v} for k, v in summary["metrics"].items()])]
    for name, rows in summary["tables"].items():
        parts += [f"\n## {name}\n", markdown_table(rows)]
    parts.append(f"\n![{chart[1]} by {chart[0]}](report.png)\n")
    write_atomic(md, "\n".join(parts))
    table, column = chart
    bar_chart(summary["tables"].get(table, []), column, f"{title}: {column}", png)
    return md, png
