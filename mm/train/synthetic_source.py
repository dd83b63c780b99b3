"""The trainer's synthetic data source (`data.kind` `synthetic_text` / `synthetic_mm`): deterministic generated
batches with a checkpointable iterator state.

Every example is a pure function of `(seed, example_id)`, and the example ids of step `s` are
`s * batch .. (s + 1) * batch - 1`, so the iterator state is just the next step; a resumed run, or N processes
each producing their own rows, see exactly the batches of one uninterrupted single-process run. The text task
is learnable (each sequence follows `x[t+1] = (a * x[t] + b) mod V` for a per-example `(a, b)` from a small
set), so loss curves mean something. The multimodal variant adds random "precomputed vision features" at the
first positions (masked out of the loss).

Batches are laid out `[grad_accum, micro_batch, ...]` so gradient accumulation is a scan over axis 0.
The other source, `mm.train.grain_source.GrainSource` (the Grain pipeline of `mm.data` over real rows: `data.kind`
`llava_json` / `preference`), has the same layout and the same `state()` / `restore()` interface.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mm.config import IMAGE_TOKEN_ID

_MULTS = (1, 3, 5, 7)


def example(seed: int, example_id: int, seq_len: int, vocab: int, num_image_tokens: int = 0,
            vision_width: int = 0, pixels: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """One example; `pixels=(channels, size)` adds raw `pixel_values [C, size, size]` (ViT in the step)."""
    rng = np.random.default_rng([seed, example_id])
    lo = 3  # ids 0..2 are pad/bos/eos
    span = vocab - lo
    a = int(rng.choice(_MULTS))
    b = int(rng.integers(1, 4))
    x = np.empty(seq_len + 1, np.int64)
    x[0] = rng.integers(0, span)
    for t in range(seq_len):
        x[t + 1] = (a * x[t] + b) % span
    seq = (x + lo).astype(np.int32)
    out = {
        "input_ids": seq[:-1].copy(),
        "labels": seq[1:].copy(),
        "loss_mask": np.ones(seq_len, np.float32),
        "segment_ids": np.ones(seq_len, np.int32),
        "positions": np.arange(seq_len, dtype=np.int32),
        "loss_weight": np.float32(1.0),
        "example_id": np.int64(example_id),
    }
    if num_image_tokens:
        out["image_features"] = rng.standard_normal((num_image_tokens, vision_width)).astype(np.float32)
        mask = np.zeros(seq_len, bool)
        mask[:num_image_tokens] = True
        out["image_mask"] = mask
        out["loss_mask"][:num_image_tokens] = 0.0
        out["input_ids"][:num_image_tokens] = IMAGE_TOKEN_ID  # replaced by the features
        if pixels is not None:
            del out["image_features"]
            ch, size = pixels
            out["pixel_values"] = rng.standard_normal((ch, size, size)).astype(np.float32)
    return out


class SyntheticSource:
    """Iterator over this process's rows of each global batch; `state()` / `restore()` for checkpoints."""

    def __init__(self, cfg: Any, *, seed: int | None = None, process_index: int = 0, process_count: int = 1,
                 multimodal: bool | None = None):
        t, d = cfg.train, cfg.data
        self.seed = int(d.seed if seed is None else seed)
        self.batch = int(t.batch_size)
        self.accum = int(cfg.optim.grad_accum)
        self.seq_len = int(t.seq_len)
        self.vocab = int(cfg.model.llm.vocab_size)
        mm = d.kind == "synthetic_mm" if multimodal is None else multimodal
        self.num_image_tokens = int(d.num_image_tokens) if mm else 0
        self.vision_width = int(cfg.model.vision_width)
        self.nan_at_steps = set(int(s) for s in d.nan_at_steps)
        self.pixels = None
        if cfg.model.kind == "vlm" and self.num_image_tokens:
            from mm.train.schema import positions_per_tile

            v = cfg.model.vision
            self.num_image_tokens = positions_per_tile(cfg)  # patch tokens (class token dropped), maybe shuffled
            self.pixels = (int(v.num_channels), int(v.image_size))
        self.micro = self.batch // self.accum
        if self.micro % process_count:
            raise ValueError(f"data: micro batch {self.micro} does not split over {process_count} processes")
        self.local = self.micro // process_count
        self.process_index = process_index
        self.step = 0

    def state(self) -> dict[str, int]:
        return {"next_step": self.step, "seed": self.seed}

    def restore(self, state: dict[str, int] | list[dict[str, int]]) -> None:
        """This process's saved state, or every saved process's (a different process count): a synthetic batch
        is a function of the step, so any process's state serves."""
        if isinstance(state, list):
            state = state[0]
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data: checkpoint was written with data.seed={state['seed']}, config has {self.seed}")
        self.step = int(state["next_step"])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rows = []
        for a in range(self.accum):
            base = step * self.batch + a * self.micro + self.process_index * self.local
            rows.append([example(self.seed, base + r, self.seq_len, self.vocab, self.num_image_tokens,
                                 self.vision_width, self.pixels) for r in range(self.local)])
        out = {k: np.stack([np.stack([ex[k] for ex in mb]) for mb in rows]) for k in rows[0][0]}
        if step in self.nan_at_steps:
            out["loss_weight"] = np.full_like(out["loss_weight"], np.nan)
        return out

    def __iter__(self) -> "SyntheticSource":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch_at(self.step)
        self.step += 1
        return b
