"""`mm-eval run`: a benchmark's items -> prompts -> batched greedy answers -> per-sample records -> the
benchmark's scores, a summary and a report. Output directory:

    meta.json                       what the records depend on (benchmark, data, model, workflow, ...); a
                                    restart with other values is refused (`mm.row_chunks`)
    samples-p{P}-{C:05d}.jsonl      process P's chunk C: one record a sample, `{"index", "id", "question",
                                    "prediction", "image_size": [W, H], **the item's ref}`
    samples.jsonl                   every record in item order, once every item has one
    summary.json                    {"benchmark", "model", "workflow", "data", "samples", "metrics", "tables"}
    report.md, report.png           the summary as Markdown tables and a bar chart (`report.py`)

Prompts are rendered as training renders a conversation (`mm.answers.Prompter`: the checkpoint tokenizer's
chat template, the image opening the first user turn), images preprocessed as the checkpoint expects
(`mm.ppl.processor_for`: pad to square with the processor's mean colour, one tile; or CATTY tiles +
thumbnail with `tiling="catty"`, one placeholder a tile), answers decoded greedily up to the first stop
token. Process p of P answers items p::P and writes its own chunks; a restarted run answers only items with
no record, so an interrupted run finishes where it stopped; process 0 merges and scores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mm.config import ConfigError
from mm.eval.benchmarks import Benchmark, Item
from mm.paths import write_atomic
from mm.row_chunks import RowChunks, barrier, my_rows

PREFIX = "samples"
META_KEYS = ("benchmark", "items", "data", "model", "workflow", "template", "tiling", "max_new_tokens")


class Images:
    """Item -> (`[tiles, 3, T, T]` pixels, (width, height)) through the checkpoint's own preprocessing."""

    def __init__(self, handle: Any, image_root: str | None, tiling: str, max_tiles: int = 8):
        from mm.data.pipeline import DataConfig, ImageTiler
        from mm.ppl import processor_for

        if tiling not in ("square", "catty"):
            raise ConfigError(f"tiling={tiling!r}: choose square or catty")
        size = int(handle.config.vision.image_size)
        self.tiler = ImageTiler(DataConfig(tiling=tiling, tile=size, max_tiles=max_tiles), processor_for(handle))
        self.root = image_root

    def __call__(self, item: Item) -> tuple[np.ndarray, tuple[int, int]]:
        from mm.data.sources import read_image

        data = item.image
        if isinstance(data, str):
            if self.root is None:
                raise ConfigError(f"item {item.id}: its image {data!r} is a path; pass --image-root")
            data = read_image(self.root, data, item.id)
        return self.decoded(data, item.id)

    def decoded(self, data: Any, name: str) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded bytes, a file or a PIL image -> (pixels, (width, height))."""
        from mm.data import images as img_lib

        image = img_lib.load_image(data, name=name)
        return self.tiler(image)[0], (image.width, image.height)


def prompt_ids(prompter: Any, question: str, placeholder: int, tiles: int) -> list[int]:
    """The chat prompt of `question` with `tiles` image placeholders (one a tile) opening the user turn, or none."""
    ids = prompter(question, tiles > 0, placeholder)
    if tiles == 0:
        return ids
    k = ids.index(placeholder)
    return ids[:k] + [placeholder] * tiles + ids[k + 1:]


def answer(handle: Any, items: Sequence[Item], images: Images, *, workflow: str, max_new_tokens: int,
           batch_size: int, template: str = "chat", log: Callable[[str], None] = lambda _: None
           ) -> list[dict[str, Any]]:
    """The records (without `index`) of `items`: the model's greedy answers in `workflow`."""
    from mm.answers import Prompter, decode, generate_all, stop_tokens

    tok = handle.tokenizer
    prompter = Prompter(tok, int(handle.config.tokens_per_image), template)
    stops = stop_tokens(handle)
    pixels, sizes, prompts = [], [], []
    for it in items:
        px, size = images(it)
        pixels.append(px)
        sizes.append(size)
        prompts.append(prompt_ids(prompter, it.question, handle.image_token, px.shape[0]))

    def gen(rows: Any, **kw: Any) -> np.ndarray:
        return handle.generate(rows, workflow=workflow, **kw)

    toks = generate_all(gen, prompts, batch=batch_size, max_new=max_new_tokens, stops=stops, pixels=pixels,
                        desc=workflow, log=log)
    return [{"id": it.id, "question": it.question, "prediction": text, "image_size": list(size), **it.ref}
            for it, text, size in zip(items, decode(tok, toks, stops), sizes)]


def run(bench: Benchmark | str, model: Any, data: str, *, out_dir: str, image_root: str | None = None,
        workflow: str | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
        template: str = "chat", tiling: str = "square", dtype: str | None = None, local_devices: int = 1,
        chunk_rows: int = 64, limit: int | None = None, process: int | None = None, processes: int | None = None,
        stop_after_chunks: int | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Answers and scores every item of `bench` on `data` (see the module docstring); returns the summary, or
    None while items are unanswered (other processes' shards, or `stop_after_chunks`: a test hook for an
    interrupted run). `model`: an mm VLM dir or a loaded `VLMHandle`. `workflow`: default the benchmark's
    ("g" for grounding when the model has it, else "mm"). `limit`: the first `limit` items only.
    `process` / `processes`: this process's shard (default: jax's process index and count)."""
    import jax

    from mm.eval import catalog, report
    from mm.ppl import load_vlm

    bench = catalog.get(bench) if isinstance(bench, str) else bench
    if batch_size < 1 or chunk_rows < 1:
        raise ConfigError(f"batch_size={batch_size}, chunk_rows={chunk_rows} must be positive")
    items = bench.read(str(data), image_root)
    items = items[:limit] if limit is not None else items
    proc = jax.process_index() if process is None else process
    nproc = jax.process_count() if processes is None else processes
    handle = load_vlm(model, dtype, local_devices)
    if handle.tokenizer is None:
        raise ConfigError(f"{model}: no tokenizer beside the checkpoint (mm-eval decodes answers)")
    wf = workflow or (bench.workflow if bench.workflow in handle.workflows else "mm")
    if wf not in handle.workflows or wf == "text":
        image_wfs = [w for w in handle.workflows if w != "text"]
        raise ConfigError(f"workflow={wf!r}: {model} has the image workflows {image_wfs}")
    max_new = int(max_new_tokens or bench.max_new_tokens)
    meta = {"benchmark": bench.name, "items": len(items), "data": str(data), "model": str(model), "workflow": wf,
            "template": template, "tiling": tiling, "max_new_tokens": max_new}
    chunks = RowChunks(out_dir, PREFIX, meta, META_KEYS)
    done = chunks.records()
    todo = [i for i in my_rows(len(items), proc, nproc) if i not in done]
    log = print if progress else (lambda _: None)
    log(f"mm-eval {bench.name} p{proc}/{nproc}: {len(items)} items, {len(todo)} to answer in this shard "
        f"(workflow {wf})")
    images = Images(handle, image_root, tiling)
    t0, written = time.time(), 0
    for start in range(0, len(todo), chunk_rows):
        part = todo[start:start + chunk_rows]
        recs = answer(handle, [items[i] for i in part], images, workflow=wf, max_new_tokens=max_new,
                      batch_size=batch_size, template=template)
        chunks.write(proc, [{"index": i, **r} for i, r in zip(part, recs)])
        written += 1
        n = start + len(part)
        rate = n / max(time.time() - t0, 1e-9)
        log(f"mm-eval {bench.name} p{proc}/{nproc}: {n}/{len(todo)} answered, {rate:.2f} items/s, "
            f"ETA {(len(todo) - n) / rate:.0f}s")
        if stop_after_chunks is not None and written >= stop_after_chunks:
            return None
    barrier("mm-eval: shards done")
    summary = None
    if proc == 0:
        summary = finish(bench, out_dir, len(items), meta)
    barrier("mm-eval: merged")
    if summary is None and (Path(out_dir) / "summary.json").exists():
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    if summary is not None:
        log(f"mm-eval {bench.name}: " + ", ".join(f"{k} {report.fmt(v)}" for k, v in summary["metrics"].items())
            + f"; wrote {Path(out_dir) / 'summary.json'} and report.md")
    return summary


def finish(bench: Benchmark, out_dir: str, total: int, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Merges the chunks; with a record for every item writes samples.jsonl, summary.json and the report."""
    from mm.eval import report

    recs = RowChunks(out_dir, PREFIX, meta, ()).records()
    if len(recs) < total:
        return None
    rows = [recs[i][0] for i in range(total)]
    out = Path(out_dir)
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    scores = bench.score(rows)
    summary = {"benchmark": bench.name, "model": meta["model"], "workflow": meta["workflow"], "data": meta["data"],
               "samples": total, **scores}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    report.write(summary, out, f"{bench.name} - {Path(meta['model']).name} ({meta['workflow']})", bench.chart)
    return summary
