"""Perplexity scoring and filtering of LLaVA-style data under a trained mm VLM (DESIGN.md section 4, POINTS).

    PPL(row) = exp(nll_sum / n_tokens),   nll_sum = -sum_t log p(token_t | image, prompt, tokens < t)

over the row's supervised tokens: exactly the tokens the training pipeline puts loss on (assistant answers and
their end-of-turn token with `template="chat"`, caption + eos with `"plain"`). Rows become examples through
the pipeline's own pieces (`mm.data.pipeline.ExampleMaker`: images decoded, tiled and normalised, template,
masks, truncation to `max_len`), are packed first-fit with segment ids (`mm.data.packing`), and run through
the model with float32 log-probs (`mm.losses.chunked_cross_entropy`, per token, no `[tokens, vocab]` logits).
Per-row sums are recovered from the segment ids on the host, in float64. A row the pipeline cannot use is
skipped and counted under its `mm.data.skips.REASONS` reason - never scored as 0 or inf.

Several processes (`jax.distributed` initialised, `mm.sharding.initialize_distributed`): process p of P scores
rows p::P on its own devices (optionally a data-parallel mesh over its local devices), no collectives but two
barriers. With `out_dir` the run is resumable; the directory holds

    meta.json                      what the scores depend on (data rows, model, template, ...); a restart with
                                   other values is refused
    scores-p{P}-{C:05d}.jsonl      process P's chunk C (written to a temp name, then renamed), one JSON a line:
                                     {"index": i, "id": "...", "nll_sum": x, "n_tokens": n, "ppl": p}   scored
                                     {"index": i, "id": "...", "skip": "<reason>", "message": "..."}      skipped
    scores.jsonl                   the scored rows of every chunk in row order, once every row has a record
    summary.json                   {"rows", "scored", "tokens", "mean_nll", "skips": {reason: n}, "skipped": [...]}

A restarted run reads every chunk, scores only its rows without a record and appends new chunks, so no row is
ever written twice (the merge checks it). `filter_rows` keeps the lowest-PPL rows of the original file (JSON
list or JSONL, order and format kept) and draws the PPL histogram with the cut.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mm.config import ConfigError
from mm.data.skips import REASONS, DataError, SkipCounter
from mm.paths import write_atomic
from mm.row_chunks import RowChunks, barrier, my_rows

META_KEYS = ("rows", "data", "model", "workflow", "template", "tiling", "max_len", "max_tiles", "system_prompt")


@dataclasses.dataclass
class ScoreResult:
    """`rows`: scored rows in row order (`index, id, nll_sum, n_tokens, ppl`); `skipped`: skipped rows
    (`index, id, skip, message`); `skips`: counts by reason (every reason of `REASONS`); `total`: rows in the
    data; `complete`: every row has a record (False after `stop_after_chunks`, or while other processes'
    shards are unfinished)."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    total: int
    complete: bool
    out_dir: str | None = None

    @property
    def skips(self) -> dict[str, int]:
        counts = {r: 0 for r in REASONS}
        for s in self.skipped:
            counts[s["skip"]] += 1
        return counts

    @property
    def tokens(self) -> int:
        return int(sum(r["n_tokens"] for r in self.rows))

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL over every scored token (nan when nothing was scored)."""
        n = self.tokens
        return float(sum(r["nll_sum"] for r in self.rows) / n) if n else float("nan")


# ------------------------------------------------------------------------------------------ loading
def load_vlm(model: Any, dtype: str | None, local_devices: int) -> Any:
    """A `VLMHandle` for `model` (a dir, or a handle passed through), data-parallel over `local_devices` of this
    process's devices (-1: all; 1: the default device); ConfigError for a checkpoint that is not a VLM."""
    import jax

    import mm
    from mm import sharding as sh
    from mm.api import VLMHandle

    if isinstance(model, VLMHandle):
        return model
    mesh = None
    if local_devices != 1:
        devs = jax.local_devices()
        n = len(devs) if local_devices == -1 else local_devices
        if not 1 <= n <= len(devs):
            raise ConfigError(f"local_devices={local_devices}: this process has {len(devs)} local devices")
        mesh = sh.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices=devs[:n]) if n > 1 else None
    handle = mm.from_pretrained(model, dtype=dtype, mesh=mesh)
    if not isinstance(handle, VLMHandle):
        raise ConfigError(f"{model}: a {type(handle).__name__} checkpoint, not a vision-language model")
    return handle


def processor_for(handle: Any) -> Any:
    """The image processor a loaded VLM expects: the `preprocessor_config.json` of the directory it was loaded
    from (`handle.source`, or its `tokenizer/`) when there is one, else CLIP's or SigLIP's defaults at the
    tower's image size."""
    from mm.data.images import ProcessorConfig

    size = int(handle.config.vision.image_size)
    if handle.source:
        for d in (Path(handle.source), Path(handle.source) / "tokenizer"):
            f = d / "preprocessor_config.json"
            if f.exists():
                return ProcessorConfig.from_hf_dict(json.loads(f.read_text()), str(f))
    if "siglip" in handle.config.vision.model_type:
        return ProcessorConfig.siglip(size)
    return ProcessorConfig.clip(size)


def read_rows(data: Any) -> Any:
    """A LLaVA JSON / JSONL file or an ArrayRecord dir (`mm-data pack`) -> random-access rows; a list of
    row dicts passes through. Bad files are `ConfigError`s naming the file."""
    if isinstance(data, list):
        return data
    from mm.train.grain_source import read_rows as read

    if not Path(data).exists():
        raise ConfigError(f"{data}: no such data file or directory")
    try:
        return read(str(data))
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        raise ConfigError(f"{data}: {e}") from e


# ------------------------------------------------------------------------------------------ the model
def nll_fn(handle: Any, workflow: str) -> Any:
    """(params, batch arrays) -> per-token NLL `[B, L]` (0 where not scored), compiled by the handle's runtime."""
    from mm.losses import chunked_cross_entropy
    from mm.models import kinds

    model = kinds.of(handle.config)
    tied = model.llm.tie_word_embeddings

    def fn(params: Any, ids: Any, positions: Any, segment_ids: Any, labels: Any, mask: Any, image_mask: Any,
           pixels: Any) -> Any:
        image = {} if pixels is None else {"pixel_values": pixels, "image_mask": image_mask}
        h, _ = model.apply(params, ids, positions, workflow=workflow, segment_ids=segment_ids, return_hidden=True,
                           **image)
        head = model.head_params(params, workflow)
        kernel = head["embed_tokens"]["embedding"].T if tied else head["lm_head"]["kernel"]
        nll = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), kernel.astype(h.dtype), labels.reshape(-1),
                                    mask.reshape(-1), reduction="none")
        return nll.reshape(labels.shape)

    return handle.runtime.jit(fn)


# ------------------------------------------------------------------------------------------ examples
class _Make:
    """Row index -> the pipeline's example (or skip record) with the row's index and id."""

    def __init__(self, rows: Any, maker: Any):
        self.rows, self.maker = rows, maker

    def __call__(self, i: int) -> dict[str, Any]:
        from mm.data.sources import row_id

        row = self.rows[i]
        ex = self.maker(row)
        ex["index"], ex["rid"] = int(i), row_id(row, i)
        return ex


def _examples(rows: Any, maker: Any, todo: Sequence[int], threads: int, batch_size: int) -> Iterator[dict[str, Any]]:
    import grain

    if not todo:
        return iter(())
    ds = grain.MapDataset.source(list(todo)).map(_Make(rows, maker))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                                     prefetch_buffer_size=max(4 * batch_size, 8))))


def _packed(examples: Iterable[dict[str, Any]], dcfg: Any) -> Iterator[tuple[str, Any]]:
    """("skip", record) and ("batch", rows of examples): first-fit packing, as the training pipeline packs."""
    from mm.data.packing import FirstFit

    def new() -> FirstFit:
        return FirstFit(dcfg.batch_size, dcfg.max_len, dcfg.max_tiles_per_row, dcfg.pack)

    fit = new()
    for ex in examples:
        if "skip" in ex:
            yield "skip", ex
            continue
        if not fit.add(ex):
            yield "batch", fit.rows
            fit = new()
            if not fit.add(ex):  # the maker truncates to max_len and checks the tile budget
                raise DataError(f"row {ex['rid']}: {len(ex['ids'])} tokens / {ex['pixels'].shape[0]} tiles do not "
                                f"fit an empty batch row ({dcfg.max_len} / {dcfg.max_tiles_per_row})")
    if not fit.empty():
        yield "batch", fit.rows


def example_sums(batch_rows: Sequence[Sequence[dict[str, Any]]], nll: np.ndarray, b: dict[str, np.ndarray]
             ) -> list[dict[str, Any]]:
    """Per-example sums from segment ids: position t of segment s carries the NLL of its token t + 1."""
    out = []
    nll = np.asarray(nll, np.float64)
    for r, row in enumerate(batch_rows):
        seg, mask = b["segment_ids"][r], b["loss_mask"][r].astype(np.float64)
        for s, ex in enumerate(row, start=1):
            here = seg == s
            n = int(round(mask[here].sum()))
            total = float(nll[r][here].sum())
            if n != int(ex["supervised"][1:].sum()):
                raise AssertionError(f"row {ex['rid']}: {n} scored tokens, {int(ex['supervised'][1:].sum())} "
                                     "supervised")
            out.append({"index": ex["index"], "id": ex["rid"], "nll_sum": total, "n_tokens": n,
                        "ppl": float(math.exp(total / n)) if n else float("nan")})
    return out


# ------------------------------------------------------------------------------------------ out_dir
PREFIX = "scores"  # chunk files OUT/scores-p{P}-{C:05d}.jsonl (mm.row_chunks)


def read_chunks(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Every record of every chunk file in `out_dir`, by row index (one record a row)."""
    recs = RowChunks(out_dir, PREFIX, json.loads((Path(out_dir) / "meta.json").read_text()), ()).records()
    return {i: r[0] for i, r in recs.items()}


def _result(records: dict[int, dict[str, Any]], total: int, out_dir: str | None) -> ScoreResult:
    scored = [records[i] for i in sorted(records) if "skip" not in records[i]]
    skipped = [records[i] for i in sorted(records) if "skip" in records[i]]
    return ScoreResult(scored, skipped, total, len(records) == total, out_dir)


def merge(out_dir: str | os.PathLike, total: int) -> ScoreResult:
    """Reads every chunk; when every row has a record writes `scores.jsonl` (row order) and `summary.json`."""
    res = _result(read_chunks(out_dir), total, str(out_dir))
    if res.complete:
        out = Path(out_dir)
        write_atomic(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in res.rows))
        summary = {"rows": total, "scored": len(res.rows), "tokens": res.tokens, "mean_nll": res.mean_nll,
                   "skips": res.skips, "skipped": res.skipped[:100]}
        write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return res


# ------------------------------------------------------------------------------------------ scoring
def score(model: Any, data: Any, *, image_root: str | None = None, out_dir: str | None = None,
          batch_size: int = 8, max_len: int = 2048, template: str = "chat", tiling: str = "square",
          workflow: str = "mm", pack: bool = True, max_tiles: int = 8, max_tiles_per_row: int = 18,
          system_prompt: str | None = None, tokenizer: Any = None, dtype: str | None = None,
          local_devices: int = 1, read_threads: int = 2, chunk_rows: int = 512,
          stop_after_chunks: int | None = None, progress: bool = True, progress_every: float = 10.0) -> ScoreResult:
    """Scores every row of `data` under `model` (see the module docstring for what is scored and written).

    model: an mm VLM dir (IAA or LLaVA-style), an HF Llava dir, or a loaded `VLMHandle`. data: a LLaVA JSON /
    JSONL file, an ArrayRecord dir, or a list of row dicts; `image_root` resolves the rows' image paths.
    `template` / `tiling` / `max_len` / `max_tiles` / `system_prompt` are `mm.data.pipeline.DataConfig`'s, and
    should be those the model was trained with (`tiling="square"`: LLaVA's pad-to-square, one tile an image;
    `"catty"`: POINTS tiles + thumbnail). `workflow`: the IAA branch to score with ("mm"; "text" scores text
    only). `batch_size` rows of `max_len` tokens per step, packed first-fit (`pack=False`: one example a row);
    the scores do not depend on either. `local_devices`: a data-parallel mesh over this many local devices
    (-1: all; 1: the default device). `out_dir`: resumable chunked output, required with several processes.
    `stop_after_chunks`: return after writing that many chunks (a test hook for interrupted runs).
    """
    import jax

    from mm.data.pipeline import DataConfig, ExampleMaker
    from mm.data.packing import assemble, bucket_length

    proc, nproc = jax.process_index(), jax.process_count()
    if nproc > 1 and out_dir is None:
        raise ConfigError("mm.ppl.score: several processes need out_dir (each writes its own chunks there)")
    if batch_size < 1 or max_len < 2 or chunk_rows < 1:
        raise ConfigError(f"mm.ppl.score: batch_size={batch_size}, max_len={max_len}, chunk_rows={chunk_rows} "
                          "must be positive (max_len >= 2)")
    rows = read_rows(data)
    total = len(rows)
    handle = load_vlm(model, dtype, local_devices)
    tok = handle.tokenizer
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if tok is None:
        raise ConfigError(f"{model}: no tokenizer beside the checkpoint; pass tokenizer=")
    if len(tok) > handle.config.lm.llm.vocab_size:
        raise ConfigError(f"tokenizer has {len(tok)} tokens > the model's vocab_size {handle.config.lm.llm.vocab_size}")
    if workflow not in handle.workflows:
        raise ConfigError(f"workflow={workflow!r}: {model} has {handle.workflows}")
    text_only = workflow == "text"
    dcfg = DataConfig(template=template, max_len=max_len, batch_size=batch_size, pack=pack,
                      tiling="none" if text_only else tiling, tile=int(handle.config.vision.image_size),
                      max_tiles=max_tiles, tokens_per_tile=int(handle.config.tokens_per_image),
                      max_tiles_per_row=0 if text_only else max_tiles_per_row, shuffle=False, num_epochs=1,
                      read_threads=read_threads, system_prompt=system_prompt)
    maker = ExampleMaker(dcfg, tok, image_root, processor=processor_for(handle))

    out = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict[str, Any]] = {}
    if out is not None:
        meta = {"rows": total, "data": str(data) if not isinstance(data, list) else "<list>", "model": str(model),
                "workflow": workflow, "template": template, "tiling": dcfg.tiling, "max_len": max_len,
                "max_tiles": max_tiles, "system_prompt": system_prompt}
        chunks = RowChunks(out, PREFIX, meta, META_KEYS)
        done = {i: r[0] for i, r in chunks.records().items()}
    mine = my_rows(total, proc, nproc)
    todo = [i for i in mine if i not in done]
    fn = nll_fn(handle, workflow)
    counter = SkipCounter(max_skip_fraction=1.0)
    new: dict[int, dict[str, Any]] = {}
    buffer: list[dict[str, Any]] = []
    written, t0, last = 0, time.time(), time.time()
    shard_done = len(mine) - len(todo)
    if progress:
        print(f"mm-ppl p{proc}/{nproc}: {len(mine)} rows in this shard, {shard_done} already scored", flush=True)

    def report(final: bool = False) -> None:
        n = len(new)
        rate = n / max(time.time() - t0, 1e-9)
        left = len(todo) - n
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        print(f"mm-ppl p{proc}/{nproc}: {shard_done + n}/{len(mine)} rows ({counter.skipped} skipped), "
              f"{rate:.1f} samples/s, ETA {'0s' if final else eta}", flush=True)

    def flush() -> None:
        nonlocal written
        if out is not None and buffer:
            chunks.write(proc, buffer)
            written += 1
        buffer.clear()

    stopped = False
    for kind, item in _packed(_examples(rows, maker, todo, read_threads, batch_size), dcfg):
        if kind == "skip":
            reason, rid, msg = item["skip"]
            counter.add_skip(reason, rid, msg)
            recs = [{"index": item["index"], "id": item["rid"], "skip": reason, "message": msg}]
        else:
            used = max(sum(len(e["ids"]) for e in r) for r in item)
            length = dcfg.max_len if dcfg.pack else bucket_length(used, dcfg.length_buckets)
            b = assemble(item, length, max(dcfg.max_tiles_per_row, 1), dcfg.tile_shape, dcfg.np_pixel_dtype)
            pix = None if text_only else b["pixel_values"]
            args = handle.runtime.inputs(b["input_ids"], b["positions"], b["segment_ids"], b["labels"],
                                         b["loss_mask"], b["image_mask"], pix)
            recs = example_sums(item, np.asarray(fn(handle.params, *args)), b)
            counter.used += len(recs)
        for r in recs:
            new[r["index"]] = r
        buffer.extend(recs)
        if len(buffer) >= chunk_rows:
            flush()
            if stop_after_chunks is not None and written >= stop_after_chunks:
                stopped = True
                break
        if progress and time.time() - last >= progress_every:
            report()
            last = time.time()
    if not stopped:
        flush()
    if progress:
        report(final=not stopped)
    if out is None:
        return _result(new, total, None)
    if stopped:
        return _result(read_chunks(out), total, str(out))
    barrier("mm-ppl: shards done")
    if proc == 0:
        res = merge(out, total)
    barrier("mm-ppl: merged")
    if proc != 0:
        res = _result(read_chunks(out), total, str(out))
    if progress and res.complete and proc == 0:
        print(f"mm-ppl: {len(res.rows)} rows scored, {len(res.skipped)} skipped "
              f"({', '.join(f'{k}={v}' for k, v in res.skips.items() if v) or 'none'}); mean NLL "
              f"{res.mean_nll:.4f} over {res.tokens} tokens; wrote {out / 'scores.jsonl'}", flush=True)
    return res


def heldout_loss(model: Any, data: Any, *, image_root: str | None = None, **kw: Any) -> float:
    """Token-weighted mean NLL (nats per supervised token; lower is better) of `model` on `data`: the summed
    NLL of every scored token over their number. `model` is a checkpoint dir (or `VLMHandle`), `data` a LLaVA
    JSON / JSONL file (or ArrayRecord dir); keywords are `score`'s. `DataError` if no row could be scored."""
    res = score(model, data, image_root=image_root, progress=kw.pop("progress", False), **kw)
    if not res.rows:
        raise DataError(f"{data}: no row could be scored (skips: {res.skips})")
    return res.mean_nll


# ------------------------------------------------------------------------------------------ filtering
def _raw_rows(data: str | os.PathLike) -> tuple[list[Any], list[str] | None]:
    """The file's rows as parsed (ids not added) and, for JSONL, its non-empty lines verbatim."""
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{data}: no such data file (filter takes a JSON list or JSONL file)")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text), None
        lines = [line for line in text.splitlines() if line.strip()]
        return [json.loads(line) for line in lines], lines
    except json.JSONDecodeError as e:
        raise ConfigError(f"{data}: not a JSON list or JSONL file ({e})") from e


def _load_scores(scores: Any) -> list[dict[str, Any]]:
    if isinstance(scores, ScoreResult):
        return list(scores.rows)
    if isinstance(scores, (str, os.PathLike)):
        p = Path(scores)
        p = p / "scores.jsonl" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"{scores}: no such scores file (mm-ppl score writes OUT/scores.jsonl)")
        try:
            return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not a JSONL scores file ({e})") from e
    return list(scores)


def filter_rows(data: str | os.PathLike, scores: Any, *, keep: float | None = None, max_ppl: float | None = None,
                out: str | os.PathLike, histogram: str | os.PathLike | None = None) -> dict[str, Any]:
    """Writes the kept rows of `data` to `out` in their original order and format (JSON list -> JSON list,
    JSONL -> the same lines) and a PPL histogram PNG with the cut (default `<out stem>.ppl_hist.png`).

    `keep` (0 < keep <= 1): the floor(keep * scored) rows of lowest PPL, ties broken by row index; or `max_ppl`:
    every row with PPL <= it. Rows without a score (skipped when scoring) are never kept. `scores`: a scores
    JSONL file (or its `mm-ppl score` dir), a `ScoreResult`, or its row dicts; each must name a row of `data`
    by index and id. Returns the counts: rows, scored, unscored, kept, dropped, threshold, out, histogram."""
    from mm.data.sources import row_id

    if (keep is None) == (max_ppl is None):
        raise ConfigError("filter: give exactly one of keep (a fraction) or max_ppl")
    if keep is not None and not 0 < keep <= 1:
        raise ConfigError(f"filter: keep={keep} must be in (0, 1]")
    rows, lines = _raw_rows(data)
    recs = _load_scores(scores)
    name, seen = Path(data).name, set()
    for r in recs:
        i = int(r["index"])
        if not 0 <= i < len(rows):
            raise ConfigError(f"{data}: scores name row {i} ({r.get('id')}), the file has {len(rows)} rows")
        row = rows[i]
        want = row_id(row, i) if not isinstance(row, dict) or "id" in row else f"{name}:{i}"
        if str(r["id"]) != want or i in seen:
            raise ConfigError(f"{data}: score for row {i} has id {r['id']!r}, the row's is {want!r}"
                              if i not in seen else f"{data}: row {i} is scored twice")
        if not (math.isfinite(float(r["ppl"])) and r["n_tokens"] > 0):
            raise ConfigError(f"{data}: row {i} ({want}) has ppl {r['ppl']} over {r['n_tokens']} tokens")
        seen.add(i)
    order = sorted(recs, key=lambda r: (float(r["ppl"]), int(r["index"])))
    if keep is not None:
        kept_recs = order[:int(math.floor(keep * len(order) + 1e-9))]
    else:
        kept_recs = [r for r in order if float(r["ppl"]) <= max_ppl]
    kept = sorted(int(r["index"]) for r in kept_recs)
    threshold = float(max_ppl) if max_ppl is not None else (float(kept_recs[-1]["ppl"]) if kept_recs else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if lines is None:
        write_atomic(out, json.dumps([rows[i] for i in kept], ensure_ascii=False) + "\n")
    else:
        write_atomic(out, "".join(lines[i] + "\n" for i in kept))
    hist = Path(histogram) if histogram is not None else out.with_name(out.stem + ".ppl_hist.png")
    _histogram([float(r["ppl"]) for r in recs], set(kept), [int(r["index"]) for r in recs], threshold, hist)
    return {"rows": len(rows), "scored": len(recs), "unscored": len(rows) - len(recs), "kept": len(kept),
            "dropped": len(recs) - len(kept), "threshold": threshold, "out": str(out), "histogram": str(hist)}


def _histogram(ppl: list[float], kept: set[int], index: list[int], threshold: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if ppl:
        lo, hi = max(min(ppl), 1e-3), max(max(ppl), 1e-3)
        bins = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 1.01, 41)
        ax.hist([p for p, i in zip(ppl, index) if i in kept], bins=bins, color="tab:green", alpha=0.8, label="kept")
        ax.hist([p for p, i in zip(ppl, index) if i not in kept], bins=bins, color="tab:gray", alpha=0.6,
                label="dropped")
        ax.set_xscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"cut {threshold:.4g}")
    ax.set_xlabel("perplexity (log scale)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(kept)} of {len(ppl)} scored rows kept")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
