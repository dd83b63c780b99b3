"""TFDS builders (array_record, no TensorFlow): build, read back through TFDS' data source, feed the pipeline."""

from __future__ import annotations

import json

from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker
from mm.data.sources import read_llava
from mm.data.synthetic import write_llava_dataset
from mm.data.tfds_builder import LlavaJson, MmSyntheticLlava, TfdsRows, build
from tests.helpers.tokenizer import make_tokenizer


def test_shipped_synthetic_dataset_builds_and_trains(tmp_path):
    b = build(MmSyntheticLlava, str(tmp_path))
    rows = TfdsRows(b)
    assert len(rows) == MmSyntheticLlava.NUM_ROWS
    assert b.info.file_format.value == "array_record"
    cfg = DataConfig(max_len=256, batch_size=4, tile=28, tokens_per_tile=2, max_tiles_per_row=40, shuffle=False)
    p = DataPipeline(rows, cfg, ExampleMaker(cfg, make_tokenizer(), None), shard_index=0, shard_count=1)
    bs = list(p)
    assert p.metrics()["data/used"] == len(rows) and p.metrics()["data/skipped"] == 0
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in bs) == len(rows)


def test_llava_json_builder_keeps_rows_and_image_bytes(tmp_path):
    path, root = write_llava_dataset(str(tmp_path / "src"), 10, seed=3, min_side=16, max_side=40)
    rows = read_llava(path)
    rows.append({"id": "gone", "image": "../x.png", "conversations": rows[0]["conversations"]})
    (tmp_path / "d.json").write_text(json.dumps(rows))
    b = build(LlavaJson, str(tmp_path / "tfds"), json_path=str(tmp_path / "d.json"), image_root=root)
    assert b.skips.used == 10 and b.skips.counts["path_escape"] == 1
    got = {r["id"]: r for r in (TfdsRows(b)[i] for i in range(10))}
    for r in rows[:10]:
        imgs = [r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])
        assert got[r["id"]]["conversations"] == r["conversations"]
        assert got[r["id"]]["_image_bytes"] == [open(f"{root}/{p}", "rb").read() for p in imgs]
