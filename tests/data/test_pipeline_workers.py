"""Resume equality with Grain worker processes (`worker_count > 0`, spawned workers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker
from mm.data.sources import read_llava
from mm.data.synthetic import write_llava_dataset
from tests.helpers.tokenizer import make_tokenizer


def test_resume_with_two_workers(tmp_path):
    path, root = write_llava_dataset(str(tmp_path), 24, seed=5, min_side=16, max_side=60)
    rows = read_llava(path)
    tok = make_tokenizer()
    cfg = DataConfig(max_len=96, batch_size=2, tile=28, tokens_per_tile=2, max_tiles_per_row=24, seed=7,
                     worker_count=2)
    make = lambda c: DataPipeline(rows, c, ExampleMaker(c, tok, root), shard_index=0, shard_count=1)  # noqa: E731
    single = list(make(DataConfig(**{**cfg.__dict__, "worker_count": 0})))
    p = make(cfg)
    head = [next(p) for _ in range(3)]
    state = json.loads(json.dumps(p.state()))  # what a checkpoint stores
    ref = head + list(p)  # the uninterrupted run
    q = make(cfg)
    q.restore(state)
    got = head + list(q)
    for pipe in (p, q):
        pipe.close()
    assert len(got) == len(ref) and len(ref) > 4
    for x, y in zip(got, ref):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # the stream depends on the worker count: a state restores only into a pipeline with as many workers
    for other in (0, 3):
        r = make(DataConfig(**{**cfg.__dict__, "worker_count": other}))
        with pytest.raises(ValueError, match=f"written with data.workers=2, the config has {other}"):
            r.restore(state)
        r.close()
    # every row once, whatever the number of workers
    count = lambda bs: sum(int(b["segment_ids"].max(axis=1).sum()) for b in bs)  # noqa: E731
    assert count(ref) == count(single) == len(rows)
