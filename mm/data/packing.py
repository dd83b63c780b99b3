"""Examples -> fixed-shape batches: first-fit packing with segment ids and per-segment positions, and
padding to bucketed lengths (a handful of shapes, so the train step compiles a handful of times).

An example is a dict with `ids` int32 [n], `supervised` bool [n] (token t is a target), `image_mask` bool [n]
and `pixels` float32 [tiles, 3, T, T] (tiles of all its images, in order). In a batch row, segment s occupies
a contiguous range, `segment_ids` is s (1-based; 0 is padding), `positions` restart at 0 for each segment,
`labels[t] = ids[t+1]` within the segment and `loss_mask[t] = supervised[t+1]`, so the last token of a
segment never predicts the first token of the next. A row's tiles are laid out in order of appearance, so
the model's splice (`image_mask` cumsum) pairs feature k with the k-th image position of the row.
Examples of a preference pair with precomputed reference log-probs (`ref_logps`, a float; one example a row)
also give the per-row `ref_logps` float32 [B] (`mm.train.reference_logps`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets ascending); n itself above the largest is an error."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"length {n} is over the largest bucket {max(buckets)}")


class FirstFit:
    """Open rows of a batch, each with a token budget and a tile budget; `add` puts an example in the first
    row where it fits (or returns False: the batch is full for it)."""

    def __init__(self, rows: int, length: int, max_tiles: int, pack: bool = True):
        self.length, self.max_tiles, self.pack = length, max_tiles, pack
        self.rows: list[list[dict[str, Any]]] = [[] for _ in range(rows)]
        self.used = [0] * rows
        self.tiles = [0] * rows

    def add(self, ex: dict[str, Any]) -> bool:
        n, k = len(ex["ids"]), int(ex["pixels"].shape[0])
        for r in range(len(self.rows)):
            if self.pack or not self.rows[r]:
                if self.used[r] + n <= self.length and self.tiles[r] + k <= self.max_tiles:
                    self.rows[r].append(ex)
                    self.used[r] += n
                    self.tiles[r] += k
                    return True
            if not self.pack and not self.rows[r]:
                return False
        return False

    def empty(self) -> bool:
        return not any(self.rows)


def assemble(rows: Sequence[Sequence[dict[str, Any]]], length: int, max_tiles: int,
             tile_shape: tuple[int, ...], pixel_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Rows of examples -> one batch of numpy arrays (see the module docstring for the layout)."""
    b = len(rows)
    out = {
        "input_ids": np.zeros((b, length), np.int32),
        "labels": np.zeros((b, length), np.int32),
        "loss_mask": np.zeros((b, length), np.float32),
        "segment_ids": np.zeros((b, length), np.int32),
        "positions": np.zeros((b, length), np.int32),
        "image_mask": np.zeros((b, length), bool),
        "pixel_values": np.zeros((b, max_tiles) + tuple(tile_shape), pixel_dtype),
        "tile_mask": np.zeros((b, max_tiles), bool),
        "loss_weight": np.ones((b,), np.float32),
    }
    for r, row in enumerate(rows):
        t = k = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex["ids"])
            sl = slice(t, t + n)
            out["input_ids"][r, sl] = ex["ids"]
            out["labels"][r, t:t + n - 1] = ex["ids"][1:]
            out["loss_mask"][r, t:t + n - 1] = ex["supervised"][1:]
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(n)
            out["image_mask"][r, sl] = ex["image_mask"]
            m = int(ex["pixels"].shape[0])
            out["pixel_values"][r, k:k + m] = ex["pixels"]
            out["tile_mask"][r, k:k + m] = True
            t, k = t + n, k + m
        if not row:
            out["loss_weight"][r] = 0.0
    if any("ref_logps" in ex for row in rows for ex in row):  # precomputed DPO reference: one example a row
        out["ref_logps"] = np.array([sum(ex["ref_logps"] for ex in row) for row in rows], np.float32)
    return out
