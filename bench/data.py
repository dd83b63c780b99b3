"""Samples/s of the full input pipeline (decode, tile, normalise, tokenise with exact masks, pack) against a
PyTorch `DataLoader` doing LLaVA-1.5's preprocessing on the same generated data in the same run.

- baseline (torch): per row `Image.open().convert("RGB")`, LLaVA's `expand2square` (mean colour), transformers'
  `CLIPImageProcessorPil` (336, the no-torchvision path); the vicuna_v1 prompt tokenised around `<image>`
  (one `-200` placeholder per image) and labels masked by re-tokenising each round and subtracting lengths
  (LLaVA-1.5's method); collate pads to the longest row. `DataLoader(num_workers=0 / 2)`.
- ours: `mm.data.pipeline.DataPipeline` with `tiling="square"` (the same pixels: pad to square + CLIP 336),
  576 image positions per image written into the sequence, chat template masks from per-turn spans, first-fit
  packing into 2048-token rows; `worker_count=0 / 2`; float32 pixels (the processor's output) and uint8 pixels
  (normalised on device by `normalize_pixels`). Also `tiling="catty"` (POINTS, up to 9 tiles) for scale.

Run: `python bench/data.py [--rows 768] [--batch 8] [--workers 0,1,2]`. Times exclude each loader's first batch
from every worker (worker start-up: Grain's spawned workers import the library, DataLoader's fork; a second worker
still starting inside the timed window made 2 workers look slower than none on a short run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm.config import IMAGE_TOKEN_ID  # noqa: E402


IGNORE = -100
IMAGE_INDEX = IMAGE_TOKEN_ID


# ------------------------------------------------------------------------------------------ baseline
class LlavaDataset:
    """LLaVA-1.5 style preprocessing (written for this benchmark from the paper's recipe)."""

    def __init__(self, rows, root, tokenizer):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        self.rows, self.root, self.tok = rows, root, tokenizer
        self.proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        self.fill = tuple(int(x * 255) for x in self.proc.image_mean)

    def __len__(self):
        return len(self.rows)

    def _ids(self, prompt):
        chunks = [self.tok(c, add_special_tokens=False)["input_ids"] for c in prompt.split("<image>")]
        out = [self.tok.bos_token_id]
        for i, c in enumerate(chunks):
            if i:
                out.append(IMAGE_INDEX)
            out += c
        return out

    def __getitem__(self, i):
        import torch
        from PIL import Image

        row = self.rows[i]
        paths = row.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        pixels = []
        for p in paths:
            img = Image.open(os.path.join(self.root, p)).convert("RGB")
            w, h = img.size
            if w != h:
                side = max(w, h)
                canvas = Image.new("RGB", (side, side), self.fill)
                canvas.paste(img, ((side - w) // 2, (side - h) // 2))
                img = canvas
            pixels.append(self.proc(img, return_tensors="pt")["pixel_values"][0])
        sep, sep2 = " ", self.tok.eos_token
        system = "A chat between a curious user and an artificial intelligence assistant."
        prompt = system + sep
        for t in row["conversations"]:
            prompt += ("USER: " + t["value"] + sep) if t["from"] == "human" else ("ASSISTANT: " + t["value"] + sep2)
        ids = self._ids(prompt)
        labels = list(ids)
        cur = 1
        labels[:cur] = [IGNORE]
        for rnd in prompt.split(sep2):  # LLaVA's length subtraction
            if not rnd:
                break
            parts = rnd.split("ASSISTANT: ")
            if len(parts) != 2:
                break
            rlen = len(self._ids(rnd + sep2)) - 1
            ilen = len(self._ids(parts[0] + "ASSISTANT: ")) - 1
            labels[cur:cur + ilen] = [IGNORE] * ilen
            cur += rlen
        labels[cur:] = [IGNORE] * (len(labels) - cur)
        px = torch.stack(pixels) if pixels else torch.zeros(0, 3, 336, 336)
        return torch.tensor(ids), torch.tensor(labels), px


def collate(batch):
    import torch

    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), 0, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, (a, b, _) in enumerate(batch):
        ids[i, :len(a)], labels[i, :len(b)] = a, b
    return ids, labels, torch.cat([b[2] for b in batch])


def run_torch(rows, root, tok, workers, batch):
    import torch

    torch.set_num_threads(1)
    dl = torch.utils.data.DataLoader(LlavaDataset(rows, root, tok), batch_size=batch, num_workers=workers,
                                     collate_fn=collate, shuffle=False)
    it = iter(dl)
    first = next(it)
    for _ in range(workers - 1):  # one batch from every worker: all of them have started
        next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += b[0].shape[0]
    return n / (time.perf_counter() - t0), rows_of(first)


def rows_of(first):
    return first[0].shape[0]


# ------------------------------------------------------------------------------------------------ ours
def run_ours(rows, root, tok, workers, batch, tiling, pixel_dtype="float32"):
    from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker

    kw = dict(tile=336, tokens_per_tile=576, max_tiles_per_row=6) if tiling == "square" else \
        dict(tile=336, tokens_per_tile=144, max_tiles_per_row=18)
    cfg = DataConfig(max_len=2048 if tiling == "square" else 4096, batch_size=batch, tiling=tiling, shuffle=False,
                     worker_count=workers,
                     read_threads=1, pixel_dtype=pixel_dtype, **kw)
    p = DataPipeline(rows, cfg, ExampleMaker(cfg, tok, root), shard_index=0, shard_count=1)
    for _ in range(max(workers, 1)):  # one batch from every worker (Grain takes them in turn): all have started
        next(p)
    used0, t0 = p.counter.used, time.perf_counter()
    for _ in p:
        pass
    dt = time.perf_counter() - t0
    return (p.counter.used - used0) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--workers", default="0,1,2", help="comma list of worker counts (0: in the main process)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    from mm import tiny
    from mm.data.sources import read_llava
    from mm.data.synthetic import write_llava_dataset

    d = a.dir or tempfile.mkdtemp(prefix="mm_bench_data_")
    path, root = write_llava_dataset(d, a.rows, seed=0, min_side=200, max_side=900, fmt="jpg")
    rows = read_llava(path)
    tok = tiny.train_tokenizer(512)
    print(f"{len(rows)} rows ({sum(1 for r in rows if 'image' in r)} with images) in {d}; batch {a.batch}; "
          f"{os.cpu_count()} CPUs")
    res = {}
    for w in [int(x) for x in a.workers.split(",")]:
        res[("torch", w)] = run_torch(rows, root, tok, w, a.batch)[0]
        print(f"torch DataLoader LLaVA-1.5, workers={w}: {res[('torch', w)]:8.1f} samples/s", flush=True)
        res[("ours", w)] = run_ours(rows, root, tok, w, a.batch, "square")
        print(f"mm.data square+pack,        workers={w}: {res[('ours', w)]:8.1f} samples/s "
              f"(ratio {res[('ours', w)] / res[('torch', w)]:.2f}x)", flush=True)
        u = run_ours(rows, root, tok, w, a.batch, "square", "uint8")
        print(f"mm.data square+pack uint8,  workers={w}: {u:8.1f} samples/s (ratio {u / res[('torch', w)]:.2f}x; "
              "normalised on device)", flush=True)
        c = run_ours(rows, root, tok, w, a.batch, "catty")
        print(f"mm.data CATTY+pack,         workers={w}: {c:8.1f} samples/s (does up to 9x the pixel work)",
              flush=True)


if __name__ == "__main__":
    main()
