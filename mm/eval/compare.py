"""`mm-eval compare`: IAA's claim in one command. The same lm-eval tasks run on the base LLM and on the IAA
model's text workflow (expected: identical numbers, metric for metric and item for item, since that workflow
is the frozen base), and the VLM benchmarks run on the IAA model's image workflows (`runner.py`). One output
directory:

    compare.json        {"identical", "text": [{"task", "metric", "base", "iaa_text", "identical"}],
                         "items": {task: [items, items with identical answers]}, "vlm": {bench: summary}}
    report.md, report.png   the tables; the PNG has the text metrics side by side
    vlm/<bench>/        each VLM benchmark's own run directory

lm-eval (the `eval` extra) is imported only here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from mm.config import ConfigError
from mm.paths import write_atomic


def parse_vlm_tasks(spec: str) -> list[tuple[str, str, str | None]]:
    """"pope=DATA@IMAGES,mme=DIR" -> [(benchmark, data, image_root or None)]; ConfigError naming the part."""
    from mm.eval.catalog import NAMES

    out = []
    for part in [p for p in (spec or "").split(",") if p.strip()]:
        name, eq, rest = part.partition("=")
        if not eq or name.strip() not in NAMES or not rest:
            raise ConfigError(f"--vlm-tasks {part!r}: expected BENCH=DATA[@IMAGE_ROOT] with BENCH one of {NAMES}")
        data, _, root = rest.partition("@")
        for p in (data, root):
            if p and not Path(p).exists():
                raise ConfigError(f"--vlm-tasks {part!r}: {p}: no such file or directory")
        out.append((name.strip(), data, root or None))
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _lm_eval(path: str, workflow: str, tasks: Sequence[str], include_path: str | None, limit: int | None,
             batch_size: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mm.eval import harness_lm

    lm = harness_lm.MMLM(path, workflow=workflow, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=True,
                                   task_manager=TaskManager(include_path=include_path))


def text_rows(base: dict[str, Any], iaa: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) of lm-eval's results: the two numbers and whether they are the same float."""
    rows = []
    for task in sorted(base["results"]):
        for key, value in base["results"][task].items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            other = iaa["results"].get(task, {}).get(key)
            rows.append({"task": task, "metric": key.split(",")[0], "base": float(value),
                         "iaa_text": None if other is None else float(other),
                         "identical": other is not None and _same(float(value), float(other))})
    return rows


def item_agreement(base: dict[str, Any], iaa: dict[str, Any]) -> dict[str, list[int]]:
    """task -> [items, items whose raw answers (log-likelihoods, generations) are identical]."""
    out = {}
    for task, samples in base.get("samples", {}).items():
        other = {s["doc_id"]: s["resps"] for s in iaa.get("samples", {}).get(task, [])}
        out[task] = [len(samples), sum(other.get(s["doc_id"]) == s["resps"] for s in samples)]
    return out


def compare(base: str, model: str, tasks: Sequence[str], *, out_dir: str, include_path: str | None = None,
            vlm_tasks: Sequence[tuple[str, str, str | None]] = (), limit: int | None = None,
            batch_size: int = 8) -> dict[str, Any]:
    from mm.eval import runner

    if not tasks:
        raise ConfigError("--tasks: name at least one lm-eval task")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = _lm_eval(base, "text", tasks, include_path, limit, batch_size)
    i = _lm_eval(model, "text", tasks, include_path, limit, batch_size)
    rows, items = text_rows(b, i), item_agreement(b, i)
    identical = bool(rows) and all(r["identical"] for r in rows) and all(n == k for n, k in items.values())
    vlm = {}
    for bench, data, root in vlm_tasks:
        vlm[bench] = runner.run(bench, model, data, out_dir=str(out / "vlm" / bench), image_root=root,
                                batch_size=batch_size, limit=limit, progress=False)
    res = {"base": str(base), "model": str(model), "identical": identical, "text": rows, "items": items,
           "vlm": vlm}
    write_atomic(out / "compare.json", json.dumps(res, indent=1) + "\n")
    res["report"] = str(_report(res, out))
    return res


def _report(res: dict[str, Any], out: Path) -> Path:
    from mm.eval.report import markdown_table

    verdict = "identical to" if res["identical"] else "DIFFERENT from"
    parts = [f"# {Path(res['model']).name} vs its base {Path(res['base']).name}\n",
             f"The IAA text workflow is **{verdict}** the base LLM on every lm-eval metric and item.\n",
             "## Text (lm-eval): base LLM vs IAA text workflow\n", markdown_table(res["text"]),
             "\n## Items with identical answers\n",
             markdown_table([{"task": t, "items": n, "identical": k} for t, (n, k) in res["items"].items()])]
    for bench, s in res["vlm"].items():
        parts += [f"\n## {bench} (workflow {s['workflow'] if s else '?'})\n",
                  markdown_table([{"metric": k, "value": v} for k, v in (s or {"metrics": {}})["metrics"].items()])]
    parts.append("\n![text metrics](report.png)\n")
    write_atomic(out / "report.md", "\n".join(parts))
    _chart(res["text"], out / "report.png")
    return out / "report.md"


def _chart(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["base"] for r in rows], 0.4, label="base LLM", color="tab:gray")
    ax.bar(x + 0.2, [r["iaa_text"] or 0.0 for r in rows], 0.4, label="IAA text workflow", color="tab:blue")
    ax.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=7)
    ax.set_yscale("symlog")
    ax.legend()
    ax.set_title("lm-eval: base vs IAA text workflow")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
