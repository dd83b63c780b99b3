"""The streaming safetensors reader/writer against the `safetensors` library, and the name-map transforms."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm.config import LLMConfig
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.safetensors_io import SafetensorsCheckpoint, ShardedSafetensorsWriter
from mm.convert.llm_family import llm_name_map
from mm.checkpoints.name_map import (TRANSPOSE, SplitHeadsBias, SplitHeadsIn, SplitHeadsOut, save_unit,
                                     transpose2d)
from mm.checkpoints.safetensors_io import INDEX_FILE, PlannedTensor, plan_shards


def test_reader_matches_torch_for_every_float_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = {f"t.{dt}": torch.randn(5, 7, generator=g).to(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    ref["scalar_like"] = torch.randn(1, generator=g)
    save_file(ref, str(tmp_path / "model.safetensors"))
    with SafetensorsCheckpoint(tmp_path) as ck:
        assert set(ck.tensors) == set(ref)
        for name, t in ref.items():
            got = ck.read(name)
            assert got.shape == tuple(t.shape)
            np.testing.assert_array_equal(got.view(np.uint8), t.contiguous().view(torch.uint8).numpy())
        streamed = dict(ck.iter_tensors(sorted(ref), read_ahead_bytes=10))
        assert sorted(streamed) == sorted(ref)
        assert all(np.array_equal(streamed[n].view(np.uint8), ck.read(n).view(np.uint8)) for n in ref)


def test_writer_output_reads_back_with_safe_open_and_shards_as_planned(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal((i + 1, 300)).astype(dt)
              for i, dt in enumerate([np.float32, ml_dtypes.bfloat16, np.float16, np.float32, ml_dtypes.bfloat16])}
    plan = [PlannedTensor(n, a.shape, a.dtype) for n, a in arrays.items()]
    w = ShardedSafetensorsWriter(tmp_path, plan, max_shard_bytes=3000)
    with pytest.raises(ConversionError, match="expected w0"):
        w.write("w1", arrays["w1"])
    for n, a in arrays.items():
        w.write(n, a)
    w.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == len(w.shards) > 1
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    for n, a in arrays.items():
        with safe_open(str(tmp_path / index["weight_map"][n]), "pt") as f:
            t = f.get_tensor(n)
            np.testing.assert_array_equal(t.view(torch.uint8).numpy().reshape(-1), a.reshape(-1).view(np.uint8))
            assert f.metadata() == {"format": "pt"}


def test_writer_refuses_to_close_incomplete(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [PlannedTensor("a", (2,), np.dtype(np.float32))])
    with pytest.raises(ConversionError, match="not written"):
        w.close()


def test_plan_shards_is_greedy_and_never_splits_a_tensor():
    items = [PlannedTensor(str(i), (n,), np.dtype(np.uint8)) for i, n in enumerate([4, 4, 10, 1, 1])]
    assert [[t.name for t in s] for s in plan_shards(items, 8)] == [["0", "1"], ["2"], ["3", "4"]]


def test_single_file_without_index_and_ambiguous_directory(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert set(SafetensorsCheckpoint(tmp_path).tensors) == {"a"}
    save_file({"b": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ConversionError, match="no model.safetensors.index.json"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"garbage!garbage!")
    (tmp_path / "y.safetensors").unlink()
    with pytest.raises(ConversionError, match="x.safetensors"):
        SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("shape", [(1, 1), (3, 50), (33, 17), (256, 40)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_transpose2d(shape, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    y = transpose2d(x)
    assert y.dtype == x.dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(y.view(np.uint8), np.ascontiguousarray(x.T).view(np.uint8))


def test_transforms_against_explicit_index_formulas():
    h, hd, d = 3, 4, 5
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((h * hd, d))        # torch q_proj.weight: out = W @ x
    k = SplitHeadsIn(h).to_mm(w_in)
    for a, b, c in np.ndindex(d, h, hd):
        assert k[a, b, c] == w_in[b * hd + c, a]
    w_out = rng.standard_normal((d, h * hd))       # torch o_proj.weight
    o = SplitHeadsOut(h).to_mm(w_out)
    for a, b, c in np.ndindex(h, hd, d):
        assert o[a, b, c] == w_out[c, a * hd + b]
    bias = rng.standard_normal(h * hd)
    np.testing.assert_array_equal(SplitHeadsBias(h).to_mm(bias)[1], bias[hd:2 * hd])
    for t, x in ((SplitHeadsIn(h), w_in), (SplitHeadsOut(h), w_out), (SplitHeadsBias(h), bias), (TRANSPOSE, w_out)):
        assert t.to_mm(x).shape == t.mm_shape(x.shape)
        np.testing.assert_array_equal(t.to_hf(t.to_mm(x)), x)


def test_llm_map_covers_the_flax_param_tree_exactly():
    from mm.models.llm import abstract_params
    import flax.linen as nn
    import jax

    for cfg in (LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=4),
                LLMConfig(model_type="qwen2", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3,
                          num_heads=2, num_kv_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=True)):
        tree = nn.unbox(abstract_params(cfg))
        flat = {tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
        assert flat == llm_name_map(cfg).expected_mm_paths()


def test_save_units():
    assert save_unit(("layers_3", "self_attn", "q_proj", "kernel")) == ("layers_3",)
    assert save_unit(("embed_tokens", "embedding")) == ("embed_tokens",)
    assert save_unit(("vision", "encoder", "layers_0", "mlp", "fc1", "kernel")) == ("vision", "encoder", "layers_0")
    assert save_unit(("norm", "scale")) == ("norm",)
    # outside the layers a unit is one module, never a whole top-level subtree (an IAA branch's embedding and
    # head are vocab x d each)
    assert save_unit(("mm", "embed_tokens", "embedding")) == ("mm", "embed_tokens")
    assert save_unit(("mm", "lm_head", "kernel")) == ("mm", "lm_head")
    assert save_unit(("mm", "layers_2", "mlp", "up_proj", "kernel")) == ("mm", "layers_2")
