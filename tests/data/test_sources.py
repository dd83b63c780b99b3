"""Sources: LLaVA JSON / JSONL reading, image paths confined to the root, ArrayRecord packing (`mm-data pack`)
read back through Grain giving exactly the batches of the JSON source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from launch.data import main as mm_data
from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker
from mm.data.skips import SampleSkip
from mm.data.sources import ArrayRecordRows, decode_record, encode_record, read_llava, resolve_image_path
from mm.data.synthetic import write_llava_dataset
from tests.helpers.tokenizer import make_tokenizer


def test_read_json_and_jsonl(tmp_path):
    rows = [{"id": "a", "conversations": []}, {"conversations": []}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_llava(tmp_path / "d.json") == [rows[0], {"id": "d.json:1", "conversations": []}]
    assert [r["id"] for r in read_llava(tmp_path / "d.jsonl")] == ["a", "d.jsonl:1"]
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="bad.json"):
        read_llava(tmp_path / "bad.json")


def test_image_paths_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "out.png").write_bytes(b"x")
    os.symlink(tmp_path / "out.png", root / "escape.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")
    os.symlink(tmp_path, root / "dirlink")
    assert resolve_image_path(root, "sub/a.png") == str((root / "sub" / "a.png").resolve())
    assert resolve_image_path(root, "inside.png") == str((root / "sub" / "a.png").resolve())  # symlink inside: ok
    for rel in ("../out.png", "sub/../../out.png", str(tmp_path / "out.png"), "/etc/passwd", "escape.png",
                "dirlink/out.png", ""):
        with pytest.raises(SampleSkip) as e:
            resolve_image_path(root, rel, "r9")
        assert e.value.reason == "path_escape" and e.value.row_id == "r9", rel
    with pytest.raises(SampleSkip) as e:
        resolve_image_path(root, "sub/none.png")
    assert e.value.reason == "missing_image"


def test_record_encoding_round_trip():
    row = {"id": "x", "image": ["a.png", "b.jpg"], "conversations": [{"from": "human", "value": "<image> é"}]}
    back = decode_record(encode_record(row, [b"\x00\x01", b"abc"]))
    assert back["_image_bytes"] == [b"\x00\x01", b"abc"]
    assert back["image"] == ["a.png", "b.jpg"] and back["conversations"] == row["conversations"]


def test_pack_cli_and_array_record_pipeline_equal_json(tmp_path, capsys):
    path, root = write_llava_dataset(str(tmp_path), 14, seed=2, min_side=16, max_side=60)
    rows = read_llava(path)
    rows.append({"id": "broken", "image": "nope.png", "conversations": rows[0]["conversations"]})
    rows.append({"id": "noans", "conversations": rows[0]["conversations"][:1]})
    (tmp_path / "with_bad.json").write_text(json.dumps(rows))
    rc = mm_data(["pack", "--json", str(tmp_path / "with_bad.json"), "--image-root", root, "--out",
                  str(tmp_path / "ar"), "--shards", "3", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "written 14 rows, skipped 2" in out and "missing_image: 1" in out and "broken" in out
    ar = ArrayRecordRows(str(tmp_path / "ar"))
    assert len(ar) == 14 and len(ar.paths) == 3
    assert {r["id"] for r in ar} == {r["id"] for r in rows[:14]}
    by_id = {r["id"]: r for r in ar}
    for r in rows[:14]:  # the stored bytes are the files' bytes
        imgs = [r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])
        assert by_id[r["id"]]["_image_bytes"] == [open(os.path.join(root, p), "rb").read() for p in imgs]

    # same rows in the same order -> the same batches, from JSON files or from the shards
    tok = make_tokenizer()
    cfg = DataConfig(max_len=128, batch_size=2, tile=28, tokens_per_tile=2, max_tiles_per_row=24, shuffle=False)
    ordered = [by_id[r["id"]] for r in rows[:14]]
    a = list(DataPipeline(rows[:14], cfg, ExampleMaker(cfg, tok, root), shard_index=0, shard_count=1))
    b = list(DataPipeline(ordered, cfg, ExampleMaker(cfg, tok, None), shard_index=0, shard_count=1))
    c = list(DataPipeline(ar, DataConfig(**{**cfg.__dict__, "shuffle": True}), ExampleMaker(cfg, tok, None),
                          shard_index=0, shard_count=1))
    assert len(a) == len(b) and len(c) > 0
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert sum(int(x["segment_ids"].max(axis=1).sum()) for x in c) == 14
