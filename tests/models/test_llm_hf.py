"""`mm.from_pretrained` on HF and mm checkpoints against transformers: logits (>= 256 tokens, float32) and greedy
generation of left-padded batches, for Llama (GQA, MHA, llama3 RoPE scaling) and Qwen2 (biases, tied / untied)."""

import numpy as np
import pytest
import torch

import mm
from mm import sharding as sh
from mm.convert.registry import hf_to_mm
from mm.generate import left_pad
from tests.helpers import hf_models

VARIANTS = ["llama-gqa", "llama-mha", "llama-llama3", "qwen2-tied", "qwen2-untied"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for v in VARIANTS:
        hf_dir = hf_models.make_model(root, v, tokenizer=v == "llama-llama3")
        mm_dir = hf_to_mm(hf_dir, root / f"{v}-mm", progress=False)
        out[v] = (hf_dir, mm_dir, hf_models.load_hf(hf_dir))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers_on_300_tokens(checkpoints, variant):
    hf_dir, mm_dir, ref = checkpoints[variant]
    ids = np.random.RandomState(0).randint(0, 128, (2, 300))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.float().numpy()
    for path in (hf_dir, mm_dir):
        got = mm.from_pretrained(path).logits(ids)
        assert got.dtype == np.float32 and got.shape == expected.shape
        err = float(np.abs(got - expected).max())
        assert err <= 1e-4, (variant, str(path), err)


@pytest.mark.parametrize("variant", ["llama-llama3", "qwen2-tied"])
def test_greedy_generation_matches_transformers_on_a_left_padded_batch(checkpoints, variant):
    hf_dir, mm_dir, ref = checkpoints[variant]
    rs = np.random.RandomState(1)
    prompts = [rs.randint(3, 128, n).tolist() for n in (23, 9, 16)]
    model = mm.from_pretrained(mm_dir)
    got = model.generate(prompts, max_new_tokens=20, stop_tokens=())
    t = max(map(len, prompts))
    ids, mask = left_pad(prompts, t, 0)
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(), max_new_tokens=20,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == out[:, t:].tolist()


def test_stop_at_eos_and_text_round_trip(checkpoints):
    hf_dir, mm_dir, ref = checkpoints["llama-llama3"]
    model = mm.from_pretrained(mm_dir)
    assert model.tokenizer is not None
    text = model.generate_text(["the quick brown", "a picture of"], max_new_tokens=12)
    assert len(text) == 2 and all(isinstance(t, str) for t in text)
    toks = model.generate([[5, 6, 7]], max_new_tokens=30, stop_tokens=())
    stop = int(toks[0, 3])
    first = int(np.argmax(toks[0] == stop))
    stopped = model.generate([[5, 6, 7]], max_new_tokens=30, stop_tokens=[stop])
    assert stopped[0, :first + 1].tolist() == toks[0, :first + 1].tolist() and (stopped[0, first + 1:] == 0).all()


def test_sharded_handle_equals_unsharded(checkpoints):
    hf_dir, mm_dir, ref = checkpoints["qwen2-untied"]
    ids = np.random.RandomState(2).randint(0, 128, (8, 64))
    plain = mm.from_pretrained(mm_dir).logits(ids)
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2, "data": 1})
    sharded = mm.from_pretrained(mm_dir, mesh=mesh)
    q = sharded.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec[:2] == ("fsdp", "tensor")
    np.testing.assert_allclose(sharded.logits(ids), plain, atol=2e-5, rtol=0)


def test_bf16_compute_stays_close(checkpoints):
    hf_dir, mm_dir, ref = checkpoints["llama-gqa"]
    ids = np.random.RandomState(3).randint(0, 128, (1, 64))
    f32 = mm.from_pretrained(mm_dir).logits(ids)
    bf16 = mm.from_pretrained(mm_dir, dtype="bfloat16").logits(ids)
    err = np.abs(bf16 - f32).max()
    assert 1e-6 < err < 0.1, err


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        mm.from_pretrained(tmp_path)
