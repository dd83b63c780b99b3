"""HF -> mm -> HF on tiny random Llama / Qwen2 checkpoints: the map is proven by logits parity against
transformers, and by bit-identical round trips (names, dtypes, bytes)."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mm.checkpoints.mm_dir import params_metadata
from mm.checkpoints.safetensors_io import SafetensorsCheckpoint
from mm.convert.registry import hf_to_mm, load, mm_to_hf, read_config
from mm.checkpoints.safetensors_io import INDEX_FILE
from mm.models.llm import LLM
from tests.helpers.hf_models import load_hf, make_model

VARIANTS = ["llama-gqa", "llama-mha", "llama-llama3", "qwen2-tied", "qwen2-untied"]


def read_all(hf_dir):
    """{name: (dtype, raw bytes)} of every tensor in an HF directory (single or sharded)."""
    with SafetensorsCheckpoint(hf_dir) as ck:
        return {n: (ck.tensors[n].dtype, ck.read(n).tobytes()) for n in ck.tensors}


def assert_same_tensors(a_dir, b_dir):
    a, b = read_all(a_dir), read_all(b_dir)
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n][0] == b[n][0], n
        assert a[n][1] == b[n][1], n


def hf_logits(hf_dir, ids):
    with torch.no_grad():
        return load_hf(hf_dir)(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, 128, (2, 256)).astype(np.int32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_and_round_trip_is_bit_identical(tmp_path, variant, ids):
    src = make_model(tmp_path, variant)
    mm = hf_to_mm(src, tmp_path / "mm", progress=False)
    config = read_config(mm)
    assert config.tie_word_embeddings == (variant == "qwen2-tied")
    assert config.attention_bias == variant.startswith("qwen2")
    assert (config.rope_scaling is not None) == (variant == "llama-llama3")
    params = load(mm)[1]
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    logits, _ = LLM(config).apply({"params": params}, ids)
    ref = hf_logits(src, ids)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    back = mm_to_hf(mm, tmp_path / "back", progress=False)
    assert_same_tensors(src, back)
    model, info = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_array_equal(hf_logits(back, ids[:1, :32]), ref[:1, :32])


def test_bf16_checkpoint_round_trips_bit_identical_with_keep_and_via_float32(tmp_path):
    src = make_model(tmp_path, "llama-gqa", dtype=torch.bfloat16)
    mm = hf_to_mm(src, tmp_path / "mm", progress=False)
    assert {dt for _, dt in params_metadata(mm).values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert read_config(mm).param_dtype == "bfloat16"
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    back = mm_to_hf(mm, tmp_path / "back", progress=False)
    assert_same_tensors(src, back)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"

    mm32 = hf_to_mm(src, tmp_path / "mm32", dtype="float32", progress=False)
    assert {dt for _, dt in params_metadata(mm32).values()} == {np.dtype(np.float32)}
    back16 = mm_to_hf(mm32, tmp_path / "back16", dtype="bfloat16", progress=False)
    assert_same_tensors(src, back16)


def test_sharded_input_and_output(tmp_path, ids):
    single = make_model(tmp_path / "a", "qwen2-untied")
    sharded = make_model(tmp_path / "b", "qwen2-untied", max_shard_size="60KB")
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    p1 = load(hf_to_mm(single, tmp_path / "mm1", progress=False))[1]
    mm2 = hf_to_mm(sharded, tmp_path / "mm2", progress=False)
    p2 = load(mm2)[1]
    flat1 = {k: v for k, v in __import__("jax").tree_util.tree_leaves_with_path(p1)}
    flat2 = {k: v for k, v in __import__("jax").tree_util.tree_leaves_with_path(p2)}
    assert flat1.keys() == flat2.keys()
    for k in flat1:
        np.testing.assert_array_equal(flat1[k], flat2[k])

    out = mm_to_hf(mm2, tmp_path / "out", max_shard_bytes=50_000, progress=False)
    out_index = json.loads((out / INDEX_FILE).read_text())
    files = set(out_index["weight_map"].values())
    assert len(files) > 2 and all((out / f).exists() for f in files)
    sizes = {f: 0 for f in files}
    for name, f in out_index["weight_map"].items():
        with safe_open(str(out / f), "numpy") as h:
            assert name in h.keys()
    for f in files:
        sizes[f] = (out / f).stat().st_size
    assert out_index["metadata"]["total_size"] == sum(
        v.nbytes for v in SafetensorsCheckpoint(out).tensors.values())
    assert_same_tensors(single, out)
    np.testing.assert_array_equal(hf_logits(out, ids[:1, :16]), hf_logits(single, ids[:1, :16]))


def test_tokenizer_and_generation_config_are_carried_both_ways(tmp_path):
    from transformers import AutoTokenizer

    src = make_model(tmp_path, "llama-gqa", tokenizer=True)
    mm = hf_to_mm(src, tmp_path / "mm", progress=False)
    assert (mm / "tokenizer" / "tokenizer.json").exists()
    assert (mm / "generation_config.json").exists()
    back = mm_to_hf(mm, tmp_path / "back", progress=False)
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(str(back))(text).input_ids == AutoTokenizer.from_pretrained(str(src))(
        text).input_ids
    template = AutoTokenizer.from_pretrained(str(src)).chat_template
    assert AutoTokenizer.from_pretrained(str(back)).chat_template == template
    assert json.loads((back / "generation_config.json").read_text()) == json.loads(
        (src / "generation_config.json").read_text())


def test_load_mm_params_onto_shardings_and_in_config_dtype(tmp_path):
    import jax

    mm = hf_to_mm(make_model(tmp_path, "qwen2-tied"), tmp_path / "mm", progress=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    params = load(mm, dtype="bfloat16", shardings=sharding)[1]
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) and x.sharding == sharding for x in leaves)
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    ref = load(mm)[1]
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]),
                                  ref["norm"]["scale"].astype(ml_dtypes.bfloat16))


def test_load_mm_params_onto_a_mesh_with_a_tree_of_named_shardings(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mm = hf_to_mm(make_model(tmp_path, "llama-gqa"), tmp_path / "mm", progress=False)
    ref = load(mm)[1]
    devices = np.array(jax.devices()[:4])
    assert devices.size == 4, "tests/conftest.py asks XLA for 8 CPU devices"
    mesh = Mesh(devices, ("fsdp",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp") if x.shape[0] % 4 == 0 else P()), ref)
    params = load(mm, shardings=shardings)[1]
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
        assert x.sharding == s, path
        np.testing.assert_array_equal(np.asarray(x), _get(ref, path))
    with pytest.raises(Exception, match="shardings tree has no entry"):
        load(mm, shardings={"norm": {"scale": NamedSharding(mesh, P())}})


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree
