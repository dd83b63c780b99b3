"""Precomputed DPO reference log-probs (`dpo.precompute_reference = True`, TRL's `precompute_ref_log_probs`).

Before step 1 the reference (the starting weights, or `dpo.reference`, exactly as `mm.train.initial_params` builds
it) scores every pair of the training data - and of `data.eval_path` when the run evaluates - in one pass, and
is then dropped: the train step holds no reference params and runs no reference forward (the step's FLOPs are
the policy's alone). The sums are kept with the run, one file a data set:

    WORKDIR/reference_logps/{train,eval}.json   {"meta": {...what they depend on...},
                                                  "logps": {row id: [chosen, rejected]}}

A restarted run reads them instead of scoring again (a file whose meta differs - other data, reference, init
sources, model or sequence layout - is refused, naming the key). The pipeline attaches each row's pair to its
two examples by row id (`mm.data.packing.assemble` writes them as the per-row `ref_logps` batch key), so ids
must be unique; a row the pipeline skips has no entry and is skipped in training too.

The pass builds its batches as the trainer does (`mm.train.grain_source.data_config`: the same micro batch,
row length, tiles and template; process p of P fills its local rows with rows p::P), runs the same
`mm.train.preference.pair_logps` under the mesh, and gathers the sums on every process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mm.config import ConfigError
from mm.paths import as_path, local_copy, write_atomic
from mm.row_chunks import barrier

DIR = "reference_logps"
META_KEYS = ("data", "rows", "reference", "init", "model", "seq_len", "template", "tokenizer", "image_root",
             "tiling", "max_tiles", "max_tiles_per_row")


def data_sets(cfg: Any) -> dict[str, str]:
    """{name: path} of the data sets a run needs reference log-probs for."""
    from mm.train.grain_source import source_path

    out = {"train": source_path(cfg)}
    if int(cfg.train.eval_every) and source_path(cfg, evaluation=True) != out["train"]:
        out["eval"] = source_path(cfg, evaluation=True)
    return out


def _meta(cfg: Any, path: str, rows: int) -> dict[str, Any]:
    d = cfg.data
    return {"data": str(as_path(path)), "rows": rows, "reference": cfg.dpo.reference or "starting weights",
            "init": {k: cfg.init[k] for k in ("llm_checkpoint", "vision_checkpoint", "checkpoint", "seed")},
            "model": cfg.model.to_dict(), "seq_len": int(cfg.train.seq_len), "template": str(d.template),
            "tokenizer": str(d.tokenizer), "image_root": str(d.image_root), "tiling": str(d.tiling),
            "max_tiles": int(d.max_tiles), "max_tiles_per_row": int(d.max_tiles_per_row)}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))  # tuples as lists: what the file holds after a round trip


def prepare(cfg: Any, b: Any, workdir: str | Path, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """{data path: table} for `data_sets(cfg)`: read from `WORKDIR/reference_logps/` or computed (and written
    by process 0) with the reference of `b` (a `mm.train.loop.Built` whose state still holds the starting
    params). Every process returns every table."""
    from mm.train import param_groups as pg
    from mm.train import preference
    from mm.train.initial_params import build_reference
    from mm.train.grain_source import read_rows

    out_dir = as_path(workdir) / DIR
    tables: dict[str, dict[str, Any]] = {}
    reference = None
    for name, path in data_sets(cfg).items():
        rows = read_rows(path)
        meta = _jsonable(_meta(cfg, path, len(rows)))
        f = out_dir / f"{name}.json"
        if f.exists():
            saved = json.loads(f.read_text())
            diff = [k for k in META_KEYS if saved["meta"].get(k) != meta.get(k)]
            if diff:
                raise ConfigError(f"{f}: reference log-probs of another run ({', '.join(diff)} differ: "
                                  f"{diff[0]} = {saved['meta'].get(diff[0])!r} there, {meta.get(diff[0])!r} now); "
                                  "use a fresh workdir or delete the file")
            tables[path] = saved["logps"]
            log(f"reference log-probs ({name}): {len(tables[path])} pairs read from {f}")
            continue
        if reference is None:
            params = pg.merge(b.state["params"], b.frozen)
            flat_sh = {p: x.sharding for p, x in pg.flatten(params).items()}
            ref = build_reference(cfg, b.model, b.state["params"], flat_sh, b.mesh)
            reference = preference.reference_params({**params, preference.REFERENCE_KEY: ref})[1]
        t0 = time.perf_counter()
        tables[path] = compute(cfg, b, reference, rows, path, name, log)
        log(f"reference log-probs ({name}): {len(tables[path])} pairs of {len(rows)} rows in "
            f"{time.perf_counter() - t0:.1f} s -> {f}")
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(f, json.dumps({"meta": meta, "logps": tables[path]}) + "\n")
        barrier(f"mm-train: reference log-probs {name}")
    return tables


def compute(cfg: Any, b: Any, reference: Any, rows: Any, path: str, name: str = "train",
            log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """{row id: [chosen, rejected]} summed completion log-probs of every usable pair of `rows` under the
    `reference` params (see the module docstring)."""
    from transformers import AutoTokenizer

    from mm import sharding as shd
    from mm.data.packing import assemble
    from mm.data.pipeline import ExampleMaker
    from mm.data.sources import row_id
    from mm.train.grain_source import data_config, device_arrays
    from mm.train.preference import HALVES, pair_logps

    proc, nproc = jax.process_index(), jax.process_count()
    local = int(cfg.train.batch_size) // int(cfg.optim.grad_accum) // nproc
    dcfg = data_config(cfg, seed=0, local_rows=local)
    tok = AutoTokenizer.from_pretrained(str(local_copy(cfg.data.tokenizer)))
    maker = ExampleMaker(dcfg, tok, str(cfg.data.image_root) or None)
    m = b.model
    fn = shd.sharded_jit(lambda p, x: pair_logps(m.sequence_logps, m.pixel_features, p,
                                                 {k: v[0] for k, v in x.items()})[0], b.mesh, b.rules)
    mine = list(range(proc, len(rows), nproc))
    steps = math.ceil(math.ceil(len(rows) / nproc) / local)
    table: dict[str, list[float]] = {}
    first: dict[str, int] = {}
    skipped = 0
    t0 = last = time.perf_counter()
    for s in range(steps):
        idx = mine[s * local:(s + 1) * local]
        halves: tuple[list[list[dict[str, Any]]], ...] = ([], [])
        index = np.full((1, local), -1, np.int32)
        for j, i in enumerate(idx):
            ex = maker(rows[i])
            if "skip" in ex:
                skipped += 1
                continue
            for h, e in zip(halves, ex["pair"]):
                h.append([e])
            index[0, len(halves[0]) - 1] = i
        for h in halves:
            h += [[] for _ in range(local - len(h))]
        batch = {}
        for half, h in zip(HALVES, halves):
            a = assemble(h, int(cfg.train.seq_len), dcfg.max_tiles_per_row, dcfg.tile_shape, dcfg.np_pixel_dtype)
            batch.update({f"{half}/{k}": v[None] for k, v in device_arrays(a, dcfg).items()})
        g = shd.global_batch(batch, b.batch_sharding, nproc)
        lp = _gather(fn(reference, g))
        got = _gather(shd.global_batch({"index": index}, b.batch_sharding, nproc)["index"])[0]
        n = got.shape[0]
        for k, i in enumerate(got):
            if i < 0:
                continue
            rid = row_id(rows[int(i)])
            if rid in table:
                raise ConfigError(f"{path}: rows {first[rid]} and {int(i)} share the id {rid!r}; "
                                  "dpo.precompute_reference keys the reference log-probs by row id")
            first[rid] = int(i)
            table[rid] = [float(lp[k]), float(lp[n + k])]
        now = time.perf_counter()
        if now - last > 10 or s == steps - 1:
            done = min((s + 1) * local * nproc, len(rows))
            rate = done / max(now - t0, 1e-9)
            log(f"reference log-probs ({name}): {done}/{len(rows)} rows, {rate:.1f} rows/s, "
                f"ETA {(len(rows) - done) / rate:.0f} s, {skipped} skipped here")
            last = now
    return table


def _gather(x: jax.Array) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
