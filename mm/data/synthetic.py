"""A generated LLaVA-format dataset (JSON + PNG/JPEG files) for tests, benchmarks and demos: deterministic
from a seed, no download. Rows mix single-image, two-image and text-only conversations of 1-3 rounds."""

from __future__ import annotations

import json
import os

import numpy as np

_WORDS = ("the quick brown fox jumps over lazy dog a picture of cat sitting on red mat what is in image "
          "describe scene one sentence there are two people and bicycle near river").split()


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(lo, hi))))


def write_llava_dataset(out_dir: str, num_rows: int, seed: int = 0, min_side: int = 24, max_side: int = 160,
                        multi_image: float = 0.1, text_only: float = 0.1, fmt: str = "png",
                        name: str = "data.json") -> tuple[str, str]:
    """Writes `out_dir/images/*.<fmt>` and `out_dir/<name>`; returns (json path, image root)."""
    rng = np.random.default_rng(seed)
    root = os.path.join(out_dir, "images")
    os.makedirs(root, exist_ok=True)
    from PIL import Image

    rows = []
    for i in range(num_rows):
        u = rng.random()
        n_img = 0 if u < text_only else (2 if u < text_only + multi_image else 1)
        paths = []
        for k in range(n_img):
            w, h = (int(x) for x in rng.integers(min_side, max_side + 1, 2))
            base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)  # smooth content compresses like a photo
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            rel = f"{i:06d}_{k}.{fmt}"
            img.save(os.path.join(root, rel))
            paths.append(rel)
        conv = []
        for r in range(int(rng.integers(1, 4))):
            q = _sentence(rng, 3, 9) + "?"
            if r == 0 and n_img:
                q = "<image>\n" * n_img + q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng, 2, 12)}]
        row = {"id": f"row{i:06d}", "conversations": conv}
        if n_img == 1:
            row["image"] = paths[0]
        elif n_img:
            row["image"] = paths
        rows.append(row)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(rows, f)
    return path, root
