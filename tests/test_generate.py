"""Sampling filters, stop tokens, left padding and compile-once-per-bucket of the generation loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm import generate as g
from mm.config import LLMConfig
from mm.models import llm

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=16)


def _draw(logits, n, **kw):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    f = jax.jit(jax.vmap(lambda k: g.sample(logits, k, jnp.float32(kw.get("t", 1.0)), jnp.int32(kw.get("k", 0)),
                                            jnp.float32(kw.get("p", 1.0)))))
    return np.asarray(f(keys))[:, 0]


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    assert int(g.sample(logits, jax.random.PRNGKey(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))[0]) == 0
    assert set(_draw(logits, 400, k=2)) == {0, 1}
    assert set(_draw(logits, 400, p=0.6)) == {0, 1}  # 0.5 < 0.6: the second token is still needed
    assert set(_draw(logits, 400, p=0.5)) == {0}
    assert set(_draw(logits, 400, k=1)) == {0}
    freq = np.bincount(_draw(logits, 4000), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.03)
    cold = np.bincount(_draw(logits, 2000, t=0.25), minlength=4) / 2000
    assert cold[0] > 0.9  # low temperature sharpens


def test_left_pad_and_positions():
    ids, mask = g.left_pad([[5, 6, 7], [9]], 4, pad_id=0)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 9]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert np.asarray(g.positions_from_mask(jnp.asarray(mask))).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        g.left_pad([[1], []], 4, 0)
    assert g.bucket(17) == 32 and g.bucket(3) == 16 and g.bucket(16) == 16


@pytest.fixture(scope="module")
def model():
    return g.Generator(llm.decode_fns(CFG), pad_id=0), llm.init_params(CFG, jax.random.PRNGKey(3))


def test_greedy_generation_equals_argmax_of_full_forward(model):
    gen, params = model
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    out, lengths = gen(params, prompts, max_new_tokens=6)
    assert out.shape == (2, 6) and lengths.tolist() == [6, 6]
    fwd = jax.jit(lambda p, x: llm.LLM(CFG).apply({"params": p}, x)[0])
    for prompt, row in zip(prompts, out):
        seq = list(prompt)
        for _ in range(6):  # no cache: the plain definition of greedy decoding (causal: trailing zeros are inert)
            x = np.zeros((1, 16), np.int32)
            x[0, :len(seq)] = seq
            seq.append(int(jnp.argmax(fwd(params, x)[0, len(seq) - 1])))
        assert seq[len(prompt):] == row.tolist()


def test_stop_tokens_end_rows_and_pad_the_rest(model):
    gen, params = model
    free, _ = gen(params, [[3, 4, 5]], max_new_tokens=8)
    stop = int(free[0, 2])
    first = int(np.argmax(free[0] == stop))  # the stop token may occur earlier than index 2
    out, lengths = gen(params, [[3, 4, 5]], max_new_tokens=8, stop_tokens=[stop])
    assert lengths.tolist() == [first + 1]
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out[0, first + 1:] == 0).all()


def test_compiles_once_per_bucket(model):
    gen, params = model
    gen._compiled.clear()
    for n, t, k in [(3, 0.0, 0), (5, 0.7, 5), (9, 1.0, 0)]:
        gen(params, [list(range(1, n + 1)), [2, 3]], max_new_tokens=5, temperature=t, top_k=k, stop_tokens=[1, 2])
    assert gen.compile_count == 1  # prompt lengths 3..9 share bucket 16; sampling settings are traced
    gen(params, [list(range(1, 20)), [2]], max_new_tokens=5)
    assert gen.compile_count == 2  # 19 tokens: the next bucket


def test_array_prompts_must_be_left_padded(model):
    gen, params = model
    with pytest.raises(ValueError, match="left-padded"):
        gen(params, np.array([[1, 2, 0]]), attention_mask=np.array([[1, 1, 0]]), max_new_tokens=2)
    a, _ = gen(params, np.array([[0, 1, 2]]), attention_mask=np.array([[0, 1, 1]]), max_new_tokens=3)
    b, _ = gen(params, [[1, 2]], max_new_tokens=3)
    assert a.tolist() == b.tolist()
