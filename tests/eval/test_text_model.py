"""`mm.eval.text_model.TextModel`, the harness-independent core of the lm-eval adapter: batched, bucketed
log-likelihoods equal one unpadded forward per request, `mesh=` shards the params without changing them, stop
strings cut generations, and a bad mesh spec names itself."""

from __future__ import annotations

import numpy as np
import pytest

from mm.config import ConfigError


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.helpers.vlm_dirs import tiny_llm_and_iaa

    return tiny_llm_and_iaa(tmp_path_factory.mktemp("text_model"))[0]


@pytest.mark.heavy
def test_loglikelihood_equals_unpadded_forwards_and_mesh(llm):
    import mm
    from mm.eval.text_model import TextModel

    pairs = [("the quick brown", " fox jumps"), ("a", " picture of a cat sitting on a red mat"), ("", " the")]
    t = TextModel(str(llm), batch_size=2, bucket=16)
    got = t.loglikelihood(pairs)
    h = mm.from_pretrained(llm)
    tok = h.tokenizer
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id] + c + tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
        x = h.logits([ids])[0].astype(np.float64)
        lp = x - x.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        n = len(ids) - 1 - len(c)
        assert ll == pytest.approx(sum(lp[p, ids[p + 1]] for p in range(len(ids) - 1 - n, len(ids) - 1)), rel=1e-5)
    assert t.logits_calls == 2  # 3 requests, batches of 2
    sharded = TextModel(str(llm), batch_size=2, bucket=16, mesh="fsdp:-1/tensor:2")
    assert dict(sharded.handle.runtime.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert [x[0] for x in sharded.loglikelihood(pairs)] == pytest.approx([x[0] for x in got], rel=1e-5)


@pytest.mark.heavy
def test_generate_cuts_at_stop_strings(llm):
    from mm.eval.text_model import TextModel

    t = TextModel(str(llm), batch_size=4)
    free = t.generate(["the quick brown", "describe the scene"], max_new_tokens=6)
    assert all(free) and len(free) == 2
    cut = t.generate(["the quick brown", "describe the scene"], until=[free[0][2:4]], max_new_tokens=6)
    assert cut[0] == free[0].split(free[0][2:4])[0] and len(cut[0]) < len(free[0])


def test_bad_mesh_spec():
    from mm.eval.text_model import parse_mesh

    with pytest.raises(ConfigError, match="mesh='fsdp=2': expected axis:size pairs joined by '/'"):
        parse_mesh("fsdp=2")
    assert parse_mesh("") is None
