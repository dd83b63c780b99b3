"""LLaVA JSON(+images) -> ArrayRecord shards, checking each row on the way (bad rows are skipped, counted by
reason and summarised, never written). Images are stored as their encoded bytes, not re-encoded."""

from __future__ import annotations

import os
from typing import Any, Iterator

from mm.data import images as img_lib
from mm.data.conversations import normalise_turns
from mm.data.skips import SampleSkip, SkipCounter
from mm.data.sources import encode_record, read_llava, read_row_images, row_id, write_array_record


def check_row(row: Any, image_root: str | None, verify_images: bool = True, preference: bool = False) -> list[bytes]:
    """The row's image bytes if the row is usable; SampleSkip otherwise."""
    rid = row_id(row)
    if not isinstance(row, dict):
        raise SampleSkip("bad_row", rid, f"row is a {type(row).__name__}, not an object")
    if preference:
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise SampleSkip("bad_row", rid, "preference row needs string 'chosen' and 'rejected'")
    else:
        normalise_turns(row.get("conversations"), rid)
    data = read_row_images(row, image_root)
    if verify_images:
        for k, b in enumerate(data):
            try:
                img_lib.load_image(b, name=f"{rid} image {k}")
            except img_lib.ImageError as e:
                raise SampleSkip("corrupt_image", rid, str(e)) from e
    return data


def pack_llava(json_path: str, image_root: str | None, out_dir: str, num_shards: int = 1, *,
               verify_images: bool = True, preference: bool = False, progress: bool = True,
               prefix: str = "data") -> tuple[list[str], SkipCounter]:
    """Writes the usable rows of `json_path` to `out_dir/<prefix>-*-of-*.array_record`; returns the shard
    paths and the counter of written / skipped rows."""
    rows = read_llava(json_path)
    counter = SkipCounter(max_skip_fraction=1.0)

    def records() -> Iterator[bytes]:
        it: Any = rows
        if progress:
            from tqdm import tqdm

            it = tqdm(rows, desc=f"pack {os.path.basename(json_path)}", unit="row")
        for row in it:
            try:
                data = check_row(row, image_root, verify_images, preference)
            except SampleSkip as e:
                counter.add_skip(e.reason, e.row_id, e.message)
                continue
            counter.used += 1
            yield encode_record(row, data)

    paths = write_array_record(records(), out_dir, num_shards, prefix)
    return paths, counter


def summary(counter: SkipCounter) -> str:
    lines = [f"written {counter.used} rows, skipped {counter.skipped}"]
    lines += [f"  {r}: {n}" for r, n in counter.counts.items() if n]
    lines += [f"  e.g. {i} ({r}): {m}" for r, i, m in counter.examples]
    return "\n".join(lines)
