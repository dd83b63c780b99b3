"""The trainer's data source over the Grain pipeline of `mm.data` (config `data.kind = "llava_json"`, or
`"preference"` for rows with `chosen` / `rejected` answers: each batch key comes twice, `chosen/<key>` and
`rejected/<key>`, the two halves of a pair at the same row index, one pair a row, see `mm.data.pipeline`).

`DataPipeline` gives batches of this process's rows of one micro batch; a training step takes `grad_accum`
of them stacked as `[grad_accum, micro_local, ...]` (the layout of `mm.train.synthetic_source.SyntheticSource`). The
iterator state is the pipeline's own (`state()` / `restore()`, JSON: Grain's state plus the skip counters), taken
between steps, so a resumed run continues with exactly the batches and counts of an uninterrupted one. The
data repeats forever (the step count ends the run); `metrics()` are the skip counters for the metrics row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mm import paths
from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker
from mm.train import schema as tcfg


def read_rows(path: str) -> Any:
    """LLaVA JSON / JSONL file, or a directory (or file) of ArrayRecord shards from `mm-data pack`."""
    p = paths.as_path(path)
    if p.suffix == ".array_record" or p.is_dir():
        if paths.is_remote(p):  # ArrayRecord's reader opens local files only
            raise ValueError(f"{path}: ArrayRecord shards on an object store; copy them to a local disk "
                             "(JSON / JSONL rows and image roots can stay there)")
        from mm.data.sources import ArrayRecordRows

        return ArrayRecordRows(str(p))
    from mm.data.sources import read_llava

    return read_llava(p)


def data_config(cfg: Any, *, seed: int, local_rows: int) -> DataConfig:
    """The pipeline config implied by the training config (tiles sized for the model's ViT). Rows are always
    `train.seq_len` long, packed or not: the compiled step has one shape, the `grad_accum` micro batches of a
    step stack, and every process of a multi-host run makes the same shapes (`pack=False` would otherwise pad
    each batch to its own length bucket)."""
    d, v = cfg.data, cfg.model.vision
    text_only = cfg.model.kind == "llm"  # a plain LLM: rows with images are skipped, batches carry no tiles
    kind = "preference" if d.kind == "preference" else "sft"  # preference: chosen / rejected pairs
    return DataConfig(kind=kind, template=str(d.template), max_len=int(cfg.train.seq_len), batch_size=local_rows,
                      pack=bool(d.pack), buckets=(int(cfg.train.seq_len),),
                      tiling="none" if text_only else str(d.tiling), tile=int(v.image_size),
                      max_tiles=int(d.max_tiles), tokens_per_tile=tcfg.positions_per_tile(cfg),
                      max_tiles_per_row=0 if text_only else int(d.max_tiles_per_row), seed=seed, num_epochs=None,
                      read_threads=int(d.read_threads), worker_count=int(d.workers),
                      max_skip_fraction=float(d.max_skip_fraction))


def device_arrays(batch: dict[str, Any], dcfg: DataConfig) -> dict[str, np.ndarray]:
    """The arrays of a pipeline batch the step takes: text-only batches (tiling "none") ship no image arrays."""
    drop = ("pixel_values", "tile_mask", "image_mask") if dcfg.tiling == "none" else ()
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and k.rsplit("/", 1)[-1] not in drop}


class WithReference:
    """An `ExampleMaker` whose pair examples carry their row's precomputed reference log-probs (`ref_logps`).
    Picklable, like the maker, for Grain workers."""

    def __init__(self, maker: Any, table: Any, path: str):
        self.maker, self.table, self.path = maker, table, path

    def __call__(self, row: Any) -> dict[str, Any]:
        ex = self.maker(row)
        if "pair" in ex:
            v = self.table.get(ex["id"])
            if v is None:
                raise ValueError(f"{self.path}: row {ex['id']!r} has no precomputed reference log-probs (the data "
                                  f"changed after reference_logps/ was written?)")
            for e, x in zip(ex["pair"], v):
                e["ref_logps"] = float(x)
        return ex


class GrainSource:
    """Iterator of `[grad_accum, micro_local, ...]` numpy batches; `state/restore/metrics/close`. With
    `reference_logps` (a preference run's precomputed table, `mm.train.reference_logps`) each pair's batch
    rows carry `chosen/ref_logps` and `rejected/ref_logps`."""

    def __init__(self, cfg: Any, *, seed: int | None = None, path: str | None = None, process_index: int = 0,
                 process_count: int = 1, reference_logps: Any = None):
        from transformers import AutoTokenizer

        self.accum = int(cfg.optim.grad_accum)
        micro = int(cfg.train.batch_size) // self.accum
        if micro % process_count:
            raise ValueError(f"data: micro batch {micro} does not split over {process_count} processes")
        self.local = micro // process_count
        self.seed = int(cfg.data.seed if seed is None else seed)
        self.dcfg = data_config(cfg, seed=self.seed, local_rows=self.local)
        tok = AutoTokenizer.from_pretrained(str(paths.local_copy(cfg.data.tokenizer)))
        if len(tok) > int(cfg.model.llm.vocab_size):
            raise ValueError(f"data.tokenizer {cfg.data.tokenizer} has {len(tok)} tokens > model.llm.vocab_size "
                             f"{cfg.model.llm.vocab_size}")
        path = str(path or cfg.data.path)
        maker: Any = ExampleMaker(self.dcfg, tok, str(cfg.data.image_root) or None)
        if cfg.data.kind == "preference" and cfg.dpo.precompute_reference:
            if reference_logps is None:
                raise ValueError(f"data: dpo.precompute_reference is set but no reference log-probs for {path}")
            maker = WithReference(maker, reference_logps, path)
        self._rows, self._maker = read_rows(path), maker
        self.process_index, self.process_count = process_index, process_count
        self.pipe = self._pipeline(start=0)
        self.step = 0

    def _pipeline(self, start: int) -> DataPipeline:
        return DataPipeline(self._rows, self.dcfg, self._maker, shard_index=self.process_index,
                            shard_count=self.process_count, start=start)

    def state(self) -> dict[str, Any]:
        """This process's state (each process saves its own, `mm.train.checkpoint`)."""
        return {"next_step": self.step, "seed": self.seed, "pipeline": self.pipe.state(), "start": self.pipe.start,
                "position": self.pipe.position(), "process_index": self.process_index,
                "process_count": self.process_count}

    def restore(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This process's saved state, or (a run resumed on a different number of processes) the list of every
        saved process's state: see `reshard`."""
        if isinstance(state, list):
            return self.reshard(state)
        self._check(state)
        if int(state.get("start", 0)) != self.pipe.start:
            self.pipe.close()
            self.pipe = self._pipeline(start=int(state["start"]))
        self.pipe.restore(state["pipeline"])
        self.step = int(state["next_step"])

    def reshard(self, states: list[dict[str, Any]]) -> None:
        """Continues a run saved by `len(states)` processes on this run's process count. The data order: the
        global order (shuffled, repeated) resumes at its first position that some saved process had not
        consumed (the smallest saved `position`), and the processes of this run split it from there as every run
        does (process i of n reads positions start + i, start + i + n, ...). Positions beyond it that other saved
        processes had consumed - less than a batch's worth each - are read again. The skip counters of every
        saved process are summed into process 0's."""
        for st in states:
            self._check(st)
        if any(st.get("position") is None for st in states):
            raise ValueError(f"data: the checkpoint's {len(states)} processes ran Grain worker processes "
                             "(data.workers > 0), whose states do not say where each process was in the global "
                             f"order; resume on {len(states)} processes")
        steps = {int(st["next_step"]) for st in states}
        if len(steps) != 1:
            raise ValueError(f"data: the checkpoint's processes saved different steps {sorted(steps)}")
        self.pipe.close()
        self.pipe = self._pipeline(start=min(int(st["position"]) for st in states))
        if self.process_index == 0:
            from mm.data.skips import SkipCounter

            total = SkipCounter()
            for st in states:
                c = st["pipeline"]["counter"]
                total.merge(c["used"], c["counts"], c["examples"])
            self.pipe.counter.restore(total.state())
        self.step = steps.pop()

    def _check(self, state: dict[str, Any]) -> None:
        if "pipeline" not in state:
            raise ValueError("data: the checkpoint's data state is not a Grain pipeline's (data.kind changed?)")
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data: checkpoint was written with data.seed={state['seed']}, config has {self.seed}")

    def metrics(self) -> dict[str, float]:
        return self.pipe.metrics()

    def close(self) -> None:
        self.pipe.close()

    def __iter__(self) -> "GrainSource":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        micro = [device_arrays(next(self.pipe), self.dcfg) for _ in range(self.accum)]
        out = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        # no per-example ids through packing: (step, accum, row) names a row in non-finite-step reports
        out["example_id"] = (self.step * 1_000_000 + np.arange(self.accum * self.local)).reshape(
            self.accum, self.local).astype(np.int64)
        self.step += 1
        return out


def source_path(cfg: Any, evaluation: bool = False) -> str:
    """The rows a Grain source reads: `data.eval_path` for evaluation when set, else `data.path`."""
    return str(cfg.data.eval_path) if evaluation and cfg.data.eval_path else str(cfg.data.path)


def make_source(cfg: Any, *, seed: int | None = None, process_index: int = 0, process_count: int = 1,
                multimodal: bool | None = None, reference_logps: Any = None) -> Any:
    """The training (or, with `seed=data.eval_seed`, evaluation) source `data.kind` selects; `reference_logps`:
    {data path: table} of a run with `dpo.precompute_reference` (`mm.train.reference_logps.prepare`)."""
    from mm.train.schema import GRAIN_KINDS

    if cfg.data.kind in GRAIN_KINDS:
        path = source_path(cfg, evaluation=seed is not None)
        return GrainSource(cfg, seed=seed, path=path, process_index=process_index, process_count=process_count,
                           reference_logps=(reference_logps or {}).get(path))
    from mm.train.synthetic_source import SyntheticSource

    return SyntheticSource(cfg, seed=seed, process_index=process_index, process_count=process_count,
                           multimodal=multimodal)
