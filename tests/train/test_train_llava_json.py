"""Training from the Grain pipeline (`data.kind = "llava_json"`): a tiny IAA model (ViT in the step) learns
from a generated LLaVA dataset with a planted corrupt image (counted in metrics.jsonl), and a run resumed from a
mid-run checkpoint gives the losses of the uninterrupted run (the pipeline's iterator state is checkpointed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mm.config import ConfigError
from mm.train import schema as tcfg
from tests.train.helpers_train import tiny_iaa_llava, write_tiny_llava

STEPS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava_json"))


def _cfg(dataset, **over):
    c = tiny_iaa_llava(*dataset)  # IAA instruction stage: the mm branch trains; base LLM and ViT frozen
    c.train.update(dict(steps=STEPS, log_every=1, eval_every=STEPS, eval_batches=1, eval_samples=2,
                        eval_max_new_tokens=6))
    c.checkpoint.update(dict(every=3, keep=10, use_async=False))
    for k, v in over.items():
        c.data[k] = v
    return c


def _rows(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_trains_counts_skips_and_resumes_exactly(dataset, tmp_path):
    import jax

    from mm.train.loop import train

    one = jax.devices()[:1]

    ref = tmp_path / "ref"
    res = train(_cfg(dataset), ref, devices=one)
    losses = [res.losses[s] for s in range(1, STEPS + 1)]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    rows = [r for r in _rows(ref) if r["kind"] == "train"]
    last = rows[-1]
    assert last["data/skipped/corrupt_image"] >= 1, last  # the planted row, seen in the first epoch
    assert last["data/used"] > 0 and last["data/skipped"] >= last["data/skipped/corrupt_image"]
    assert all("data/used" in r for r in rows)
    # evaluation: held-out losses and greedy samples per IAA workflow, written to metrics.jsonl
    all_rows = _rows(ref)
    assert {r["kind"] for r in all_rows} >= {"eval_mm", "eval_text", "text"}
    texts = {r["tag"]: r["text"] for r in all_rows if r["kind"] == "text"}
    assert set(texts) == {"samples/mm", "samples/text"}, texts
    for t in texts.values():
        assert t.count("prompt ...") == 2 and "reference" in t, t

    # "killed" after the step-3 checkpoint: later checkpoints gone, restart runs steps 4.. from the saved
    # Grain iterator state and counters
    run = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", run / "checkpoints")
    for p in (run / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 3:
            shutil.rmtree(p)
    got = train(_cfg(dataset), run, devices=one)
    assert sorted(got.losses) == list(range(4, STEPS + 1))
    assert {s: got.losses[s] for s in got.losses} == {s: res.losses[s] for s in got.losses}
    resumed_last = [r for r in _rows(run) if r["kind"] == "train"][-1]
    for k in ("data/used", "data/skipped", "data/skipped/corrupt_image"):
        assert resumed_last[k] == last[k], k


def test_llava_json_config_errors_name_the_key(dataset):
    c = _cfg(dataset)
    c.data.path = "/nonexistent/data.json"
    with pytest.raises(ConfigError, match="data.path"):
        tcfg.validate(c)
    c = _cfg(dataset)
    c.model.kind = "llm"  # a plain LLM trains on the text-only rows (rows with images are skipped)
    c.param_groups = [(".*", 1.0)]
    tcfg.validate(c)
    c.init.vision_checkpoint = dataset[0]  # ... but it runs no ViT to load a tower into
    with pytest.raises(ConfigError, match="init.vision_checkpoint"):
        tcfg.validate(c)
    c = _cfg(dataset)
    c.data.tokenizer = ""
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tcfg.validate(c)


def test_tile_features_are_each_tiles_vit_features_in_row_order():
    """`[B, tiles, C, H, W]` -> `[B, tiles * patches, D]`: row r's k-th block is the ViT on tile (r, k)."""
    import jax

    from mm.models import vision
    from mm.train.schema import base_config, vision_config_from
    from mm.train.models import tile_features

    vc = vision_config_from(base_config())
    params = vision.init_params(vc, jax.random.key(0))
    px = np.random.default_rng(0).standard_normal((2, 3, vc.num_channels, vc.image_size, vc.image_size))
    px = px.astype(np.float32)
    got = np.asarray(tile_features(vc, -2)(params, px))
    p = vc.grid_size ** 2
    assert got.shape == (2, 3 * p, vc.hidden_size)
    for r in range(2):
        for k in range(3):
            want = np.asarray(vision.image_features(params, vc, px[r, k][None], layer=-2, feature="patch"))[0]
            np.testing.assert_allclose(got[r, k * p:(k + 1) * p], want, rtol=1e-5, atol=1e-5)


def test_unpacked_rows_have_the_step_length_so_micro_batches_stack(dataset):
    """`data.pack=False` with `grad_accum=2`: every micro batch is `train.seq_len` long whatever its examples'
    lengths (the pipeline alone would pad each batch to its own length bucket, and the stack would fail)."""
    from mm.train.grain_source import GrainSource

    c = _cfg(dataset, pack=False)
    src = GrainSource(c)
    short = 0
    try:
        for _ in range(3):
            b = next(src)
            assert b["input_ids"].shape == (2, 2, 96), b["input_ids"].shape
            short += int(((b["segment_ids"] > 0).sum(-1).max(-1) <= 64).sum())
    finally:
        src.close()
    assert short, "no micro batch short enough for a smaller bucket: the case is not exercised"


@pytest.mark.heavy  # ~30 s on 2 cores: a two-tower compile and a Grain pipeline (CI runs heavy as its own step)
def test_points_trains_on_catty_tiles_with_pixel_shuffle(dataset, tmp_path):
    """POINTS' pretrain stage on the Grain pipeline: every image is cut into CATTY tiles + thumbnail, each tile
    reserves 4 positions (4x4 patches pixel-shuffled), both towers run in the step and the loss is finite."""
    import jax

    from mm.config import load_config_file
    from mm.train.grain_source import GrainSource
    from mm.train.loop import train

    c = load_config_file("configs/points.py:pretrain")
    c.unlock()
    path, root, tok = dataset
    c.data.update(dict(kind="llava_json", path=path, image_root=root, tokenizer=tok, template="chat", pack=True,
                       max_tiles=4, max_tiles_per_row=12))
    c.train.update(dict(steps=2, batch_size=2, seq_len=96, log_every=1))
    c.init.prng_impl = "unsafe_rbg"
    c.checkpoint.update(dict(every=0, use_async=False))
    c.metrics.tensorboard = False
    src = GrainSource(c)
    try:
        x = next(src)
    finally:
        src.close()
    assert x["pixel_values"].shape[2:] == (12, 3, 28, 28)
    tiles = x["tile_mask"].reshape(-1, 12).sum(-1)
    assert (tiles > 0).all() and (x["image_mask"].reshape(2, -1).sum(-1) == 4 * tiles).all()
    res = train(c, tmp_path / "run", devices=jax.devices()[:1])
    assert all(np.isfinite(v) for v in res.losses.values())
