"""The Grain input pipeline: rows -> examples (images tiled, text templated, masks exact) -> packed,
padded batches, deterministic from a seed and resumable from a saved iterator state.

    MapDataset.source(rows).shuffle(seed).repeat(epochs)[shard::shards]   # global order, then this host's part
      .map(ExampleMaker)          # decode + tile + tokenise; a bad row becomes a skip record, never an error
      .to_iter_dataset()          # threads for the per-example work
    -> PackBatchIterDataset       # first-fit packing (or one example per row, bucketed length), skip counting
    -> .mp_prefetch(workers)      # optional worker processes (spawn: entry points need `__main__` guards)

`DataPipeline` wraps the iterator for the trainer: `next()` gives numpy batches (`input_ids, labels,
loss_mask, segment_ids, positions, image_mask, pixel_values, tile_mask, loss_weight`, see `mm.data.packing`),
`state()` / `restore()` carry Grain's iterator state plus the skip counters (so a resumed run continues with
the exact batches and counts of an uninterrupted one), `metrics()` gives the counters (`data/skipped/<reason>`),
and a skipped fraction over `max_skip_fraction` raises `DataError` naming examples.

Packing state: a batch is a pure function of the parent stream from the first example it holds, so the
iterator state is the parent's state at that point; the example that closed the previous batch is re-read on
restore. `to_global` assembles this host's rows into global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from mm.data import images as img_lib
from mm.data.conversations import ConversationEncoder, Encoded, normalise_turns, truncate
from mm.data.packing import FirstFit, assemble, bucket_length
from mm.data.skips import REASONS, DataError, SampleSkip, SkipCounter
from mm.data.sources import read_row_images, row_id
from mm.data.tiling import catty_plan

STATS_KEY = "_stats"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "sft"  # "sft" | "preference"
    template: str = "chat"  # "chat" (the tokenizer's chat template) | "plain" (stage-1 captions)
    max_len: int = 2048  # tokens per batch row
    batch_size: int = 8  # rows per batch on this process
    pack: bool = True  # first-fit packing; False: one example per row, length padded to a bucket
    buckets: tuple[int, ...] = ()  # lengths for pack=False (default: powers of two up to max_len, and max_len)
    tiling: str = "catty"  # "catty" (POINTS) | "square" (LLaVA pad-to-square, one tile) | "none" (text only)
    tile: int = 336
    max_tiles: int = 8  # CATTY grid limit (the thumbnail comes on top)
    tokens_per_tile: int = 144  # image positions per tile (e.g. 24x24 patches pixel-shuffled by 4)
    max_tiles_per_row: int = 18  # tile budget of one batch row (pixel_values is [B, this, 3, tile, tile])
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1  # None: repeat forever
    read_threads: int = 2
    worker_count: int = 0
    worker_buffer: int = 1  # batches each worker may run ahead (Grain per_worker_buffer_size)
    max_skip_fraction: float = 0.5
    min_samples_for_ceiling: int = 100
    system_prompt: str | None = None
    # "float32": normalised `[tiles, 3, T, T]` (the HF processor's output); "uint8": raw RGB `[tiles, T, T, 3]`,
    # a quarter of the bytes through worker pipes and host->device copies; `normalize_pixels` finishes on device.
    pixel_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in ("sft", "preference"):
            raise ValueError(f"data.kind must be 'sft' or 'preference', got {self.kind!r}")
        if self.tiling not in ("catty", "square", "none"):
            raise ValueError(f"data.tiling must be 'catty', 'square' or 'none', got {self.tiling!r}")
        if self.pixel_dtype not in ("float32", "uint8"):
            raise ValueError(f"data.pixel_dtype must be 'float32' or 'uint8', got {self.pixel_dtype!r}")
        if self.buckets and max(self.buckets) > self.max_len:
            raise ValueError(f"data.buckets {self.buckets} go over data.max_len {self.max_len}")

    @property
    def length_buckets(self) -> tuple[int, ...]:
        if self.pack:
            return (self.max_len,)
        if self.buckets:
            return tuple(sorted(set(self.buckets) | {self.max_len}))
        out, b = [], 64
        while b < self.max_len:
            out.append(b)
            b *= 2
        return tuple(out) + (self.max_len,)

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        return (self.tile, self.tile, 3) if self.pixel_dtype == "uint8" else (3, self.tile, self.tile)

    @property
    def np_pixel_dtype(self) -> Any:
        return np.uint8 if self.pixel_dtype == "uint8" else np.float32


# ------------------------------------------------------------------------------------------ examples
class ImageTiler:
    """Decoded RGB image -> `[tiles, 3, T, T]` float32 and its number of image positions."""

    def __init__(self, cfg: DataConfig, processor: img_lib.ProcessorConfig | None = None):
        self.cfg = cfg
        self.processor = processor or img_lib.ProcessorConfig.clip(cfg.tile)
        self.normalizer = img_lib.Normalizer(self.processor)

    def __call__(self, image: Any) -> tuple[np.ndarray, int]:
        c = self.cfg
        raw = c.pixel_dtype == "uint8"
        if c.tiling == "catty":
            plan = catty_plan(image.width, image.height, c.tile, c.max_tiles, True)
            px = img_lib.cut_tiles(image, plan)
            px = px if raw else self.normalizer(px)
        elif c.tiling == "square":
            sq = img_lib.pad_to_square(image, img_lib.mean_fill(self.processor))
            if raw:  # the processor's resize + crop, without the normalisation
                w, h = img_lib.resize_output_size(sq.width, sq.height, self.processor)
                arr = np.asarray(sq.resize((w, h), self.processor.resample) if (w, h) != sq.size else sq, np.uint8)
                px = (img_lib.center_crop(arr, self.processor.crop_size) if self.processor.crop_size else arr)[None]
            else:
                px = img_lib.preprocess(sq, self.processor, self.normalizer)[None]
        else:
            raise ValueError("ImageTiler: data.tiling is 'none'")
        return px, int(px.shape[0]) * c.tokens_per_tile


def _skip(e: SampleSkip) -> dict[str, Any]:
    return {"skip": (e.reason, e.row_id, e.message)}


class ExampleMaker:
    """One row -> one example dict (or a skip record). Picklable, so Grain workers can run it."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, image_root: str | None = None,
                 processor: img_lib.ProcessorConfig | None = None, image_token_id: int | None = None):
        self.cfg = cfg
        self.image_root = image_root
        self.encoder = ConversationEncoder(tokenizer, cfg.template, image_token_id, cfg.system_prompt)
        self.tiler = ImageTiler(cfg, processor)

    def _images(self, row: dict[str, Any], rid: str) -> tuple[list[np.ndarray], list[int]]:
        pixels, tokens = [], []
        data = read_row_images(row, self.image_root)
        if data and self.cfg.tiling == "none":
            raise SampleSkip("bad_row", rid, "row has images but data.tiling is 'none'")
        for k, data in enumerate(data):
            try:
                image = img_lib.load_image(data, name=f"{rid} image {k}")
            except img_lib.ImageError as e:
                raise SampleSkip("corrupt_image", rid, str(e)) from e
            px, n = self.tiler(image)
            pixels.append(px)
            tokens.append(n)
        if sum(int(p.shape[0]) for p in pixels) > self.cfg.max_tiles_per_row:
            raise SampleSkip("too_many_tiles", rid, f"{sum(int(p.shape[0]) for p in pixels)} tiles > "
                             f"data.max_tiles_per_row={self.cfg.max_tiles_per_row}")
        return pixels, tokens

    def _example(self, enc: Encoded, pixels: list[np.ndarray], rid: str) -> dict[str, Any]:
        enc = truncate(enc, self.cfg.max_len)
        if not enc.supervised.any():
            raise SampleSkip("no_supervised_tokens", rid, f"0 supervised tokens of {len(enc)} after templating "
                             f"and truncation to {self.cfg.max_len}")
        kept = pixels[:len(enc.image_tokens)]
        px = np.concatenate(kept) if kept else np.zeros((0,) + self.cfg.tile_shape, self.cfg.np_pixel_dtype)
        return {"id": rid, "ids": enc.ids, "supervised": enc.supervised, "image_mask": enc.image_mask, "pixels": px}

    def __call__(self, row: Any) -> dict[str, Any]:
        rid = row_id(row)
        try:
            if not isinstance(row, dict):
                raise SampleSkip("bad_row", rid, f"row is a {type(row).__name__}, not an object")
            if self.cfg.kind == "preference":
                return self._preference(row, rid)
            turns = normalise_turns(row.get("conversations"), rid)
            pixels, tokens = self._images(row, rid)
            return self._example(self.encoder.encode(turns, tokens, rid), pixels, rid)
        except SampleSkip as e:
            return _skip(e)

    def _preference(self, row: dict[str, Any], rid: str) -> dict[str, Any]:
        """`{id, image, conversations (the prompt, ending with a user turn), chosen, rejected}` -> two
        examples sharing the prompt: only the final response differs, and only it is supervised."""
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise SampleSkip("bad_row", rid, "preference row needs string 'chosen' and 'rejected'")
        prompt = row.get("conversations")
        prompt = prompt if isinstance(prompt, list) else [{"from": "human", "value": str(row.get("prompt", ""))}]
        pixels, tokens = self._images(row, rid)
        out = {}
        for name in ("chosen", "rejected"):
            turns = normalise_turns(prompt + [{"from": "gpt", "value": row[name]}], rid)
            enc = self.encoder.encode(turns, tokens, rid)
            # Only the final response is supervised (earlier assistant turns belong to the prompt): it is
            # the last run of supervised tokens, since its end-of-turn token is always supervised.
            sup = enc.supervised
            start = int(np.flatnonzero(sup)[-1]) if sup.any() else 0
            while start > 0 and sup[start - 1]:
                start -= 1
            sup[:start] = False
            out[name] = self._example(enc, pixels, rid)
        return {"id": rid, "pair": (out["chosen"], out["rejected"])}


# ------------------------------------------------------------------------------------------- batching
def _stats(used: int, skips: list[tuple[str, str, str]]) -> dict[str, Any]:
    counts = {r: 0 for r in REASONS}
    for r, _, _ in skips:
        counts[r] += 1
    return {"used": used, "counts": counts, "examples": skips[:5]}


def _no_usable_sample(skips: list[tuple[str, str, str]]) -> None:
    counts = _stats(0, skips)["counts"]
    top = ", ".join(f"{r}={n}" for r, n in sorted(counts.items(), key=lambda x: -x[1]) if n)
    ex = "; ".join(f"{i} ({r}: {m})" for r, i, m in skips[:5])
    raise DataError(f"data: {len(skips)} samples in a row skipped (every row of the data at least once) and none "
                    f"usable (by reason: {top}); for example: {ex}")


class _PackBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, give_up_after: int = 0):
        super().__init__(parent)
        self._cfg = cfg
        self._give_up_after = give_up_after  # consecutive skips that prove no row is usable (0: never)
        self._start = self._parent.get_state()  # parent state before the first example of the next batch
        self._carry: dict[str, Any] | None = None

    def _new(self) -> FirstFit:
        c = self._cfg
        return FirstFit(c.batch_size, c.max_len, c.max_tiles_per_row, c.pack)

    def __next__(self) -> dict[str, Any]:
        c = self._cfg
        pair = c.kind == "preference"
        fits = [self._new(), self._new()] if pair else [self._new()]
        skips: list[tuple[str, str, str]] = []
        seen = 0

        def add(ex: dict[str, Any]) -> bool:
            parts = ex["pair"] if pair else (ex,)
            if pair:  # both halves go to the same row index, one example per row
                r = next((i for i, row in enumerate(fits[0].rows) if not row), None)
                if r is None:
                    return False
                for f, p in zip(fits, parts):
                    f.rows[r].append(p)
                return True
            return fits[0].add(ex)

        if self._carry is not None:
            add(self._carry)
            self._carry = None
            seen += 1
        while True:
            before = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                self._start = self._parent.get_state()
                if seen == 0:  # skips at the very end are logged by the maker's counter only
                    for r, i, m in skips[:5]:
                        logging.warning("data: skipped sample %s (%s) at the end of the data: %s", i, r, m)
                    raise
                break
            if "skip" in ex:
                skips.append(tuple(ex["skip"]))
                if seen == 0 and self._give_up_after and len(skips) >= self._give_up_after:
                    _no_usable_sample(skips)  # repeating data that skips everything would never yield a batch
                continue
            if not add(ex):
                self._carry = ex
                self._start = before
                break
            seen += 1
        out: dict[str, Any] = {}
        used = max((sum(len(e["ids"]) for e in row) for f in fits for row in f.rows), default=0)
        length = c.max_len if c.pack and not pair else bucket_length(max(used, 1), c.length_buckets)
        for name, f in zip(("chosen", "rejected") if pair else ("",), fits):  # pairs share one length
            b = assemble(f.rows, length, c.max_tiles_per_row, c.tile_shape, c.np_pixel_dtype)
            out.update({(f"{name}/{k}" if name else k): v for k, v in b.items()})
        out[STATS_KEY] = _stats(seen, skips)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start = state["parent"]
        self._carry = None


class PackBatchIterDataset(grain.IterDataset):
    """Examples -> fixed-shape batches (see the module docstring); skip records are counted, not batched."""

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, give_up_after: int = 0):
        super().__init__(parent)
        self._cfg = cfg
        self._give_up_after = give_up_after

    def __iter__(self) -> _PackBatchIterator:
        return _PackBatchIterator(self._parent.__iter__(), self._cfg, self._give_up_after)


def build_dataset(rows: Any, cfg: DataConfig, maker: ExampleMaker, *, shard_index: int = 0,
                  shard_count: int = 1, start: int = 0) -> grain.IterDataset:
    """The Grain pipeline over a random-access source of rows (a list, `ArrayRecordRows`, ...); `start`: the
    first position of the global order read (a run resumed on a different number of processes)."""
    ds = grain.MapDataset.source(rows)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    if start:
        ds = ds[start:]
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.map(maker)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.batch_size))
    # Repeating data: any 2 epochs' worth of consecutive samples hold every row, so that many skips in a row with
    # nothing usable means no batch will ever come - an error, not a loop that never yields.
    epoch = -(-len(rows) // max(shard_count, 1))
    it = PackBatchIterDataset(it, cfg, give_up_after=2 * epoch if cfg.num_epochs != 1 else 0)
    if cfg.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain reads absl flags in its workers (DESIGN.md section 8)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer))
    return it


class DataPipeline:
    """The trainer's view: numpy batches, `state()` / `restore()`, skip `metrics()`, the skip ceiling."""

    def __init__(self, rows: Any, cfg: DataConfig, maker: ExampleMaker, *, shard_index: int | None = None,
                 shard_count: int | None = None, start: int = 0):
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        self.cfg = cfg
        self.shard_index, self.shard_count, self.start = shard_index, shard_count, int(start)
        self.dataset = build_dataset(rows, cfg, maker, shard_index=shard_index, shard_count=shard_count,
                                     start=self.start)
        self._it = iter(self.dataset)
        self.counter = SkipCounter(cfg.max_skip_fraction, cfg.min_samples_for_ceiling)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        st = batch.pop(STATS_KEY)
        before = len(self.counter.examples)
        self.counter.merge(st["used"], st["counts"], st["examples"])
        for r, i, m in self.counter.examples[before:]:
            logging.warning("data: skipped sample %s (%s): %s", i, r, m)
        if st["counts"].get("no_supervised_tokens"):  # LLaVA's silent failure mode: say it every time
            logging.warning("data: %d sample(s) in this batch had no supervised token and were dropped (%d so far)",
                        st["counts"]["no_supervised_tokens"], self.counter.counts["no_supervised_tokens"])
        self.counter.check()
        return batch

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: Grain's iterator state, the counters and the worker count (the stream is a
        function of the seed *and* the number of workers: each worker reads its own slice)."""
        return {"grain": json.dumps(self._it.get_state()), "counter": self.counter.state(),
                "workers": self.cfg.worker_count}

    def position(self) -> int | None:
        """The first position of the global order (shuffled, repeated, before sharding) that this process has not
        consumed: every earlier position of its shard is in a batch it gave out. None with worker processes
        (Grain's state is then per worker)."""
        if self.cfg.worker_count > 0:
            return None
        k = int(self._it.get_state()["parent"]["next_index"])
        return self.start + self.shard_index + self.shard_count * k

    def restore(self, state: dict[str, Any]) -> None:
        saved = state.get("workers", self.cfg.worker_count)  # states written before the count was recorded
        if int(saved) != self.cfg.worker_count:
            raise ValueError(f"data: the checkpoint's data iterator was written with data.workers={saved}, the "
                             f"config has {self.cfg.worker_count}; the data order depends on the number of "
                             f"workers, so resume with data.workers={saved}")
        self._it.set_state(json.loads(state["grain"]))
        self.counter.restore(state["counter"])

    def metrics(self) -> dict[str, float]:
        return self.counter.metrics()

    def close(self) -> None:
        """Stops Grain's worker processes / threads (also at garbage collection)."""
        self._it.close()

    def __enter__(self) -> "DataPipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def to_global(batch: dict[str, np.ndarray], mesh: Any, batch_axes: Sequence[str] | str | None = None) -> dict[str, Any]:
    """This process's rows -> global `jax.Array`s sharded over the batch axis (default: the data-parallel
    axes of `mm.sharding`'s rules), through `mm.sharding.global_batch`; non-batch leaves are dropped."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from mm.sharding import batch_sharding, global_batch

    def sharding(ndim: int) -> Any:
        if batch_axes is None:
            return batch_sharding(mesh, ndim)
        return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))

    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    return global_batch(arrays, sharding, jax.process_count(), row_axis=0)


def normalize_pixels(pixels: Any, processor: img_lib.ProcessorConfig | None = None, tile: int = 336) -> Any:
    """uint8 `[..., T, T, 3]` (`pixel_dtype="uint8"`) -> float32 `[..., 3, T, T]` with jax, bit-identical to the
    float32 pipeline (the same 256-entry table per channel as `mm.data.images.Normalizer`)."""
    import jax.numpy as jnp

    lut = jnp.asarray(img_lib.Normalizer(processor or img_lib.ProcessorConfig.clip(tile)).lut)  # [3, 256]
    x = jnp.asarray(pixels).astype(jnp.int32)
    out = jnp.stack([lut[c][x[..., c]] for c in range(3)], axis=-3)
    return out
