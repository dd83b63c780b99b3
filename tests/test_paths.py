"""mm.paths on a local GCS (tests/helpers/gcs.py): what lands in the bucket is read back with an independent
gcsfs client, and the order of writes with the bucket's own object generations (creation times)."""

import os

import pytest

from mm import paths
from tests.helpers.gcs import BUCKET, emulator, filesystem


@pytest.fixture(scope="module")
def gcs():
    with emulator() as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # this process's epath / gcsfs clients
        try:
            yield filesystem(env)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_local_paths_are_absolute_and_uris_kept():
    assert os.fspath(paths.as_path("a/b")) == os.path.abspath("a/b")
    assert os.fspath(paths.as_path("gs://b/x")) == "gs://b/x"
    assert paths.is_remote("s3://b/x") and not paths.is_remote("/tmp/x")


def test_mirror_of_a_local_dir_is_the_dir(tmp_path):
    m = paths.Mirror(tmp_path / "w")
    assert m.local == tmp_path / "w" and m.local.is_dir()
    (m.local / "f").write_text("x")
    assert m.sync() == []
    m.close()
    assert (tmp_path / "w" / "f").read_text() == "x"


def test_mirror_pulls_appends_and_uploads_only_what_changed(gcs):
    gcs.pipe(f"{BUCKET}/run/metrics.jsonl", b'{"step": 1}\n')
    m = paths.Mirror(f"gs://{BUCKET}/run", pull=["metrics.jsonl", "absent.json"])
    assert m.local != paths.as_path(f"gs://{BUCKET}/run") and not (m.local / "absent.json").exists()
    with open(m.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    (m.local / "tb").mkdir()
    (m.local / "tb" / "events").write_bytes(b"\x00\x01")
    assert sorted(m.sync()) == ["metrics.jsonl", "tb/events"]
    assert m.sync() == []  # nothing changed since
    assert gcs.cat(f"{BUCKET}/run/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    assert gcs.cat(f"{BUCKET}/run/tb/events") == b"\x00\x01"
    (m.local / "late").write_text("z")
    local = m.local
    m.close()  # uploads the rest, removes the local copy
    assert gcs.cat(f"{BUCKET}/run/late") == b"z" and not local.exists()


def test_upload_tree_writes_the_manifest_last_and_local_copy_reads_it_back(gcs, tmp_path):
    src = tmp_path / "export"
    (src / "params" / "d").mkdir(parents=True)
    for name in ("a", "params/d/x", "params/d/y", "tokenizer.json"):
        (src / name).write_text(name)
    (src / "mm_config.json").write_text("{}")
    order = paths.upload_tree(src, f"gs://{BUCKET}/exp", last=["mm_config.json"])
    assert order[-1] == "mm_config.json" and sorted(order) == sorted(
        ["a", "params/d/x", "params/d/y", "tokenizer.json", "mm_config.json"])
    gen = {p.split("/exp/", 1)[1]: int(gcs.info(p)["generation"]) for p in gcs.find(f"{BUCKET}/exp")}
    assert gen["mm_config.json"] == max(gen.values()) and len(gen) == 5
    copy = paths.local_copy(f"gs://{BUCKET}/exp")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == sorted(order)
    assert (copy / "params" / "d" / "y").read_text() == "params/d/y"
    assert paths.local_copy(f"gs://{BUCKET}/exp") == copy  # downloaded once
    with pytest.raises(FileNotFoundError, match=f"gs://{BUCKET}/nothing"):
        paths.local_copy(f"gs://{BUCKET}/nothing")


def test_write_atomic_on_a_bucket_and_array_record_shards_there_are_refused(gcs):
    paths.write_atomic(f"gs://{BUCKET}/w.json", '{"a": 1}')
    assert gcs.cat(f"{BUCKET}/w.json") == b'{"a": 1}'
    from mm.train.grain_source import read_rows

    with pytest.raises(ValueError, match="ArrayRecord shards on an object store"):
        read_rows(f"gs://{BUCKET}/data/train.array_record")
