"""Packing: layout, labels that never cross segments, and no leakage through the model (per-segment logits of
a packed row equal the logits of each example run alone)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm import tiny
from mm.config import LLMConfig
from mm.data.packing import FirstFit, assemble, bucket_length
from mm.models import llm as llm_lib

TILE = (3, 4, 4)


def example(n, seed, tiles=0, image_at=None):
    rng = np.random.default_rng(seed)
    img = np.zeros(n, bool)
    if image_at is not None:
        img[image_at:image_at + tiles * 2] = True
    return {"id": f"e{seed}", "ids": rng.integers(10, 90, n).astype(np.int32),
            "supervised": rng.random(n) < 0.6, "image_mask": img,
            "pixels": rng.standard_normal((tiles,) + TILE).astype(np.float32)}


def test_first_fit_places_in_first_row_with_room():
    ff = FirstFit(rows=2, length=10, max_tiles=3)
    assert ff.add(example(6, 0)) and ff.add(example(6, 1)) and ff.add(example(4, 2))
    assert [len(r) for r in ff.rows] == [2, 1]  # 6+4 in row 0, 6 in row 1
    assert not ff.add(example(5, 3))  # no room anywhere
    assert ff.add(example(4, 4))
    assert not ff.add(example(1, 5, tiles=4))  # tile budget
    nf = FirstFit(rows=2, length=10, max_tiles=3, pack=False)
    assert nf.add(example(3, 0)) and nf.add(example(3, 1)) and not nf.add(example(1, 2))
    assert [len(r) for r in nf.rows] == [1, 1]


def test_assemble_layout_and_labels():
    rows = [[example(5, 0, tiles=1, image_at=1), example(4, 1)], [example(7, 2, tiles=2, image_at=0)], []]
    b = assemble(rows, 12, 3, TILE)
    a, c = rows[0]
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 5 + [2] * 4 + [0] * 3)
    np.testing.assert_array_equal(b["positions"][0, :9], [0, 1, 2, 3, 4, 0, 1, 2, 3])
    np.testing.assert_array_equal(b["input_ids"][0, :9], np.concatenate([a["ids"], c["ids"]]))
    np.testing.assert_array_equal(b["labels"][0, :4], a["ids"][1:])
    np.testing.assert_array_equal(b["loss_mask"][0, :4], a["supervised"][1:])
    assert b["loss_mask"][0, 4] == 0 and b["labels"][0, 4] == 0  # last token of a segment predicts nothing
    np.testing.assert_array_equal(b["labels"][0, 5:8], c["ids"][1:])
    assert b["loss_mask"][0, 8:].sum() == 0
    np.testing.assert_array_equal(b["pixel_values"][0, :1], a["pixels"])
    np.testing.assert_array_equal(b["pixel_values"][1, :2], rows[1][0]["pixels"])
    np.testing.assert_array_equal(b["tile_mask"], [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(b["image_mask"][0, :5], a["image_mask"])
    np.testing.assert_array_equal(b["loss_weight"], [1, 1, 0])
    assert b["segment_ids"][2].sum() == 0


def test_bucket_length():
    assert bucket_length(1, (64, 128)) == 64 and bucket_length(65, (128, 64)) == 128
    with pytest.raises(ValueError, match="over the largest bucket"):
        bucket_length(129, (64, 128))


def test_packed_logits_equal_unpacked():
    cfg = LLMConfig.from_hf_dict(tiny.llama_hf_config(96, num_hidden_layers=1, hidden_size=32, head_dim=8,
                                                      intermediate_size=64))
    rng = np.random.default_rng(0)  # random params from the abstract shapes (compiling `init` is slow on CPU)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.2, a.dtype),
                          nn.unbox(llm_lib.abstract_params(cfg)))
    model = llm_lib.LLM(cfg)
    exs = [example(n, s) for s, n in enumerate((7, 5, 9, 3))]
    ff = FirstFit(rows=2, length=16, max_tiles=0)
    for e in exs:
        assert ff.add(e)
    b = assemble(ff.rows, 16, 0, TILE)
    fwd = jax.jit(lambda ids, pos, seg: model.apply({"params": params}, ids, pos, segment_ids=seg)[0])
    packed = fwd(jnp.asarray(b["input_ids"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
    for r, row in enumerate(ff.rows):
        t = 0
        for e in row:
            n = len(e["ids"])
            ids = np.zeros((1, 16), np.int32)  # alone in a row (padded to the same shape: one compilation)
            ids[0, :n] = e["ids"]
            # one segment over the whole row: plain causal attention, the trailing filler cannot reach [:n]
            alone = fwd(jnp.asarray(ids), jnp.arange(16, dtype=jnp.int32)[None], jnp.ones((1, 16), jnp.int32))[:, :n]
            np.testing.assert_allclose(np.asarray(packed[r, t:t + n]), np.asarray(alone[0]), atol=2e-5, rtol=2e-5)
            t += n
