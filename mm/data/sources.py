"""Where rows come from: LLaVA JSON / JSONL files with an image root, and ArrayRecord shards.

A row is LLaVA's dict `{id, image, conversations: [{from, value}]}`; `image` is absent (text-only), a path,
or a list of paths, relative to the image root. Paths are resolved with escape protection: absolute paths,
`..` components and symlinks leading out of the root are refused (`path_escape`), so a dataset file cannot
make the trainer read arbitrary files. Preference rows (`{id, image, conversations (prompt), chosen,
rejected}`) use the same image rules.

ArrayRecord shards written by `write_array_record` hold one record per row: an 8-byte header length, a
JSON header (the row without its image paths plus the byte length of each image) and the encoded image
bytes as they were on disk (no re-encoding). `ArrayRecordRows` reads them with Grain's
`ArrayRecordDataSource`, so random access, sharding and shuffling work as for any Grain source.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Iterator, Sequence

from mm.data.skips import SampleSkip
from mm.paths import as_path, is_remote

IMAGES_KEY = "_image_bytes"  # decoded ArrayRecord rows carry the images' bytes under this key


def read_llava(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list or JSONL file of rows; rows without `id` get `<file>:<index>`. Raises naming the file."""
    path = as_path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON list or JSONL file ({e})") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        if isinstance(r, dict) and "id" not in r:
            r["id"] = f"{path.name}:{i}"
    return rows


def row_id(row: Any, index: int | None = None) -> str:
    if isinstance(row, dict) and "id" in row:
        return str(row["id"])
    return f"#{index}" if index is not None else "<row without id>"


def image_paths(row: dict[str, Any]) -> list[str]:
    """The row's image paths as a list (empty for text-only rows)."""
    img = row.get("image", row.get("images"))
    if img is None or img == "" or img == []:
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, (list, tuple)) and all(isinstance(p, str) for p in img):
        return list(img)
    raise SampleSkip("bad_row", row_id(row), f"'image' must be a path or a list of paths, got {img!r:.80}")


def resolve_image_path(root: str | os.PathLike, rel: str, rid: str = "?") -> str:
    """`root/rel` as a real path (or, under a URI root, as a URI), refusing anything that leaves `root`
    (SampleSkip `path_escape`) and local files that do not exist (`missing_image`)."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise SampleSkip("path_escape", rid, f"image path {rel!r} is absolute or empty")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise SampleSkip("path_escape", rid, f"image path {rel!r} contains '..'")
    if is_remote(root):  # no links on an object store: the checks above keep the key under the root; whether
        return os.fspath(as_path(root).joinpath(*parts))  # it exists, `read_image`'s one read finds out
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise SampleSkip("path_escape", rid, f"image path {rel!r} resolves to {real}, outside the image root")
    if not os.path.isfile(real):
        raise SampleSkip("missing_image", rid, f"image {rel!r} not found under {root}")
    return real


def read_row_images(row: dict[str, Any], image_root: str | os.PathLike | None) -> list[bytes]:
    """The encoded bytes of every image of the row (from the record itself, or files under the root)."""
    if IMAGES_KEY in row:
        return list(row[IMAGES_KEY])
    rid = row_id(row)
    paths = image_paths(row)
    if paths and image_root is None:
        raise SampleSkip("missing_image", rid, "row has images but no image root was given")
    return [read_image(image_root, p, rid) for p in paths]


def read_image(root: str | os.PathLike, rel: str, rid: str = "?") -> bytes:
    """The encoded bytes of image `rel` under `root` (a local directory or a URI), held to `resolve_image_path`'s
    rules; a missing file is SampleSkip `missing_image`."""
    real = resolve_image_path(root, rel, rid)
    try:
        if is_remote(real):
            return as_path(real).read_bytes()
        with open(real, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SampleSkip("missing_image", rid, f"image {rel!r} not found under {root}") from None


# ---------------------------------------------------------------------------------------- ArrayRecord
def encode_record(row: dict[str, Any], images: Sequence[bytes]) -> bytes:
    header = {k: v for k, v in row.items() if k not in ("image", "images", IMAGES_KEY)}
    header["_image_names"] = image_paths(row)
    header["_image_sizes"] = [len(b) for b in images]
    h = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return struct.pack("<Q", len(h)) + h + b"".join(images)


def decode_record(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<Q", data, 0)
    row = json.loads(data[8:8 + n].decode("utf-8"))
    off = 8 + n
    images = []
    for size in row.pop("_image_sizes"):
        images.append(bytes(data[off:off + size]))
        off += size
    if off != len(data):
        raise ValueError(f"record {row.get('id')}: {len(data) - off} trailing bytes")
    names = row.pop("_image_names")
    if names:
        row["image"] = names
    row[IMAGES_KEY] = images
    return row


def write_array_record(records: Iterable[bytes], out_dir: str | os.PathLike, num_shards: int, prefix: str = "data",
                       total: int | None = None) -> list[str]:
    """Writes records round-robin over `num_shards` files `<prefix>-0000i-of-0000n.array_record`."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{prefix}-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    try:
        for i, rec in enumerate(records):
            writers[i % num_shards].write(rec)
    finally:
        for w in writers:
            w.close()
    return paths


class ArrayRecordRows:
    """Grain random-access source over ArrayRecord shards; items are decoded row dicts."""

    def __init__(self, paths: str | Sequence[str]):
        import glob

        import grain

        if isinstance(paths, str):
            paths = sorted(glob.glob(os.path.join(paths, "*.array_record"))) if os.path.isdir(paths) else [paths]
        if not paths:
            raise FileNotFoundError("no .array_record files given")
        self.paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]
