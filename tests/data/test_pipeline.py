"""The Grain pipeline: bad data skipped and counted by reason, the skip ceiling, determinism, resume equality,
per-host shards, preference pairs, global arrays."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from mm.data.pipeline import DataConfig, DataPipeline, ExampleMaker, to_global
from mm.data.skips import REASONS, DataError
from mm.data.sources import read_llava
from mm.data.synthetic import write_llava_dataset
from tests.helpers.tokenizer import make_tokenizer

GOOD = [{"from": "human", "value": "<image>\nwhat is in the image?"}, {"from": "gpt", "value": "a dog"}]
CFG = DataConfig(max_len=96, batch_size=3, tile=28, tokens_per_tile=2, max_tiles_per_row=24, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    path, root = write_llava_dataset(str(d), 30, seed=1, min_side=16, max_side=90)
    return read_llava(path), root


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def batches(rows, root, tok, cfg=CFG, **kw):
    p = DataPipeline(rows, cfg, ExampleMaker(cfg, tok, root), shard_index=kw.pop("shard_index", 0),
                     shard_count=kw.pop("shard_count", 1))
    return p, list(p)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# The tests' chat template (tests.helpers.tokenizer.CHAT_TEMPLATE) plus two traps keyed on a row's text: a turn
# containing RAISE makes it raise, and a last turn containing LASTMARK is rendered with a trailing "!" that is
# gone once another turn follows (so the conversation does not render turn by turn as a string prefix).
TRAP_TEMPLATE = (
    "{% for m in messages %}{% if 'RAISE' in m['content'] %}{{ raise_exception('no RAISE here') }}{% endif %}"
    "{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}"
    "{% if loop.last and 'LASTMARK' in m['content'] %}{{ '!' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def test_every_skip_reason_is_counted_through_metrics(tmp_path):
    """One row per way of being dropped, through the real pipeline: each of `REASONS` is counted exactly."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "ok.png")  # CATTY at tile 28: 3x2 grid + thumbnail = 7
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "link.png")
    long_q = "what " * 200
    hi = {"from": "human", "value": "hi"}
    rows = [
        {"id": "good1", "image": "ok.png", "conversations": GOOD},
        {"id": "good2", "conversations": [hi, {"from": "gpt", "value": "a cat"}]},
        {"id": "missing", "image": "nope.png", "conversations": GOOD},
        {"id": "corrupt", "image": "corrupt.png", "conversations": GOOD},
        {"id": "dotdot", "image": "../secret.png", "conversations": GOOD},
        {"id": "absolute", "image": str(outside), "conversations": GOOD},
        {"id": "symlink", "image": "link.png", "conversations": GOOD},
        {"id": "noassistant", "image": "ok.png", "conversations": GOOD[:1]},
        {"id": "role", "image": "ok.png", "conversations": [GOOD[0], {"from": "bot", "value": "x"}]},
        {"id": "mismatch", "conversations": GOOD},
        {"id": "nosup", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "a"}]},
        "not a dict",
        {"id": "tiles", "image": ["ok.png"] * 3, "conversations": GOOD},  # 21 tiles > max_tiles_per_row 18
        {"id": "tiles2", "image": ["ok.png"] * 3, "conversations": GOOD},
        {"id": "notprefix", "conversations": [{"from": "human", "value": "hi LASTMARK"},
                                              {"from": "gpt", "value": "a"}]},
        {"id": "raises", "conversations": [hi, {"from": "gpt", "value": "RAISE"}]},
        {"id": "raises2", "conversations": [{"from": "system", "value": "RAISE"}, hi, {"from": "gpt", "value": "a"}]},
        {"id": "raises3", "image": "ok.png", "conversations": [GOOD[0], {"from": "gpt", "value": "RAISE it"}]},
    ]
    expect = {"bad_row": 1, "unknown_role": 1, "no_assistant_turn": 1, "missing_image": 1, "path_escape": 3,
              "corrupt_image": 1, "image_count_mismatch": 1, "template_not_prefix": 1, "template_error": 3,
              "too_many_tiles": 2, "no_supervised_tokens": 1}
    assert set(expect) == set(REASONS)  # a reason added to mm.data.skips needs a row here
    tok = make_tokenizer()
    tok.chat_template = TRAP_TEMPLATE
    cfg = DataConfig(max_len=64, batch_size=2, tile=28, tokens_per_tile=2, max_tiles_per_row=18,
                     max_skip_fraction=1.0)
    assert cfg.tiling == "catty" and cfg.max_tiles == 8
    p, bs = batches(rows, str(root), tok, cfg)
    m = p.metrics()
    assert {k: v for k, v in m.items() if k.startswith("data/skipped/")} == {
        f"data/skipped/{r}": float(n) for r, n in expect.items()}
    assert m["data/used"] == 2 and m["data/skipped"] == sum(expect.values())
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in bs) == 2  # the two good rows, and only they
    assert all(b["loss_mask"].sum() > 0 for b in bs)


def test_skip_ceiling_names_examples(tmp_path, tok):
    rows = [{"id": f"bad{i}", "image": f"x{i}.png", "conversations": GOOD} for i in range(8)]
    rows += [{"id": "fine", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}]
    cfg = DataConfig(max_len=64, batch_size=2, max_skip_fraction=0.5, min_samples_for_ceiling=4, shuffle=False)
    with pytest.raises(DataError, match=r"skipped .*max_skip_fraction.*missing_image=8.*bad0"):
        batches(rows, str(tmp_path), tok, cfg)


def test_determinism_and_every_row_once(data, tok):
    rows, root = data
    p1, a = batches(rows, root, tok)
    _, b = batches(rows, root, tok)
    assert_same(a, b)
    assert p1.metrics()["data/used"] == len(rows)
    segs = sum(int(b["segment_ids"].max(axis=1).sum()) for b in a)
    assert segs == len(rows)
    _, c = batches(rows, root, tok, DataConfig(**{**CFG.__dict__, "seed": 4}))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    for x in a:  # fixed shapes, and every image position has a tile
        assert x["input_ids"].shape == (3, 96) and x["pixel_values"].shape == (3, 24, 3, 28, 28)
        assert x["image_mask"].sum() == x["tile_mask"].sum() * CFG.tokens_per_tile


def test_resume_yields_the_uninterrupted_batches(data, tok):
    rows, root = data
    cfg = DataConfig(**{**CFG.__dict__, "num_epochs": 2})
    full, ref = batches(rows, root, tok, cfg)
    for k in (1, 4, len(ref) - 1):
        p = DataPipeline(rows, cfg, ExampleMaker(cfg, tok, root), shard_index=0, shard_count=1)
        head = [next(p) for _ in range(k)]
        state = json.loads(json.dumps(p.state()))  # what a checkpoint stores
        q = DataPipeline(rows, cfg, ExampleMaker(cfg, tok, root), shard_index=0, shard_count=1)
        q.restore(state)
        assert_same(head + list(q), ref)
        assert q.metrics() == full.metrics()


def test_host_shards_partition_the_data(data, tok):
    rows, root = data
    p0, a = batches(rows, root, tok, shard_index=0, shard_count=2)
    p1, b = batches(rows, root, tok, shard_index=1, shard_count=2)
    assert p0.metrics()["data/used"] + p1.metrics()["data/used"] == len(rows)
    assert abs(p0.metrics()["data/used"] - p1.metrics()["data/used"]) <= 1
    seqs = lambda bs: {tuple(r[s == i]) for x in bs for r, s in zip(x["input_ids"], x["segment_ids"])  # noqa: E731
                       for i in range(1, s.max() + 1)}
    assert not seqs(a) & seqs(b)


def test_preference_pairs(data, tok):
    rows, root = data
    prefs = []
    for r in rows[:6]:
        r = copy.deepcopy(r)
        conv = r.pop("conversations")
        prefs.append({**r, "conversations": conv[:-1], "chosen": "a red mat", "rejected": "the lazy dog"})
    cfg = DataConfig(**{**CFG.__dict__, "kind": "preference", "shuffle": False, "max_len": 256})
    p, bs = batches(prefs, root, tok, cfg)
    assert p.metrics()["data/used"] == 6
    for b in bs:
        c, r = b["chosen/input_ids"], b["rejected/input_ids"]
        for i in range(c.shape[0]):
            if not b["chosen/segment_ids"][i].any():
                continue
            cm, rm = b["chosen/loss_mask"][i] > 0, b["rejected/loss_mask"][i] > 0
            first_c, first_r = np.flatnonzero(cm)[0], np.flatnonzero(rm)[0]
            assert first_c == first_r  # the shared prompt, then the responses
            np.testing.assert_array_equal(c[i, :first_c + 1], r[i, :first_r + 1])
            # only the final response is supervised: labels under the mask decode to it (+ end of turn)
            def text(s):
                return tok.decode(tok(s, add_special_tokens=False)["input_ids"])
            assert tok.decode(b["chosen/labels"][i][cm]) == text("a red mat</s>")
            assert tok.decode(b["rejected/labels"][i][rm]) == text("the lazy dog</s>")
            np.testing.assert_array_equal(b["chosen/pixel_values"][i], b["rejected/pixel_values"][i])


def test_to_global_assembles_the_batch_on_the_mesh(data, tok):
    import jax

    from mm.sharding import make_mesh

    rows, root = data
    cfg = DataConfig(**{**CFG.__dict__, "batch_size": 8})
    _, bs = batches(rows, root, tok, cfg)
    mesh = make_mesh((4, 2, 1))
    g = to_global(bs[0], mesh)
    assert jax.process_count() == 1
    for k, v in g.items():
        assert v.shape == bs[0][k].shape
        np.testing.assert_array_equal(np.asarray(v), bs[0][k])
        assert len(v.sharding.device_set) == 8
    assert g["input_ids"].addressable_shards[0].data.shape == (1, 96)  # 8 rows over data*fsdp = 8


def test_unpacked_rows_pad_to_length_buckets(data, tok):
    rows, root = data
    cfg = DataConfig(**{**CFG.__dict__, "pack": False, "max_len": 256, "buckets": (48, 96, 160)})
    assert cfg.length_buckets == (48, 96, 160, 256)
    p, bs = batches(rows, root, tok, cfg)
    assert p.metrics()["data/used"] == len(rows)
    for b in bs:
        n = b["input_ids"].shape[1]
        longest = int((b["segment_ids"] > 0).sum(axis=1).max())
        assert n in cfg.length_buckets and longest <= n
        assert n == min(x for x in cfg.length_buckets if x >= longest)
        assert b["segment_ids"].max() <= 1  # one example per row
    assert len({b["input_ids"].shape[1] for b in bs}) > 1


@pytest.mark.parametrize("tiling", ["catty", "square"])
def test_uint8_pixels_normalised_on_device_equal_float32(data, tok, tiling):
    from mm.data.images import ProcessorConfig
    from mm.data.pipeline import normalize_pixels

    rows, root = data
    cfg = DataConfig(**{**CFG.__dict__, "tiling": tiling})
    _, f32 = batches(rows[:8], root, tok, cfg)
    _, u8 = batches(rows[:8], root, tok, DataConfig(**{**cfg.__dict__, "pixel_dtype": "uint8"}))
    assert len(f32) == len(u8)
    for a, b in zip(f32, u8):
        assert b["pixel_values"].dtype == np.uint8 and b["pixel_values"].shape[-1] == 3
        got = np.asarray(normalize_pixels(b["pixel_values"], ProcessorConfig.clip(28)))
        m = a["tile_mask"]
        np.testing.assert_array_equal(got[m], a["pixel_values"][m])
        for k in a:
            if k != "pixel_values":
                np.testing.assert_array_equal(a[k], b[k])


def test_repeating_data_that_skips_everything_stops_with_an_error(tmp_path, tok):
    """num_epochs=None (the trainer's setting) over rows that are all skipped: an error after two epochs' worth
    of samples in a row (every row seen), not a loop that never yields a batch."""
    long = [{"from": "human", "value": "word " * 80}, {"from": "gpt", "value": "a"}]
    rows = [{"id": f"long{i}", "conversations": long} for i in range(3)]
    cfg = DataConfig(max_len=32, batch_size=2, tiling="none", max_tiles_per_row=0, num_epochs=None)
    p = DataPipeline(rows, cfg, ExampleMaker(cfg, tok, None))
    with pytest.raises(DataError, match=r"6 samples in a row skipped \(every row of the data at least once\) and "
                                        r"none usable \(by reason: no_supervised_tokens=6\).*long"):
        next(iter(p))
