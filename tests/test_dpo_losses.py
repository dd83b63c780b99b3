"""DPO-family losses (`mm.dpo_losses`) on completion log-probs from `mm.losses.completion_logprobs`: the literals
at policy == reference, settings errors, and TRL 1.13's `DPOTrainer.evaluate()` on two tiny random HF Llamas
(policy A, reference B) against mm's evaluation of the converted A and B on the same rows, every metric and the
loss, for every loss type both implement (and a weighted mix, and the f-divergences)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm.dpo_losses import LOSS_TYPES, METRICS, DPOSettings, PairLogps, per_sequence_losses, preference_loss

ROWS = [  # prompt / chosen / rejected strings (completions start with a space, as TRL's examples do)
    ("user: what is in the image?", " a dog playing in the park", " a cat sitting on a red mat"),
    ("describe the scene in one sentence", " there are two people and a bicycle", " the lazy dog"),
    ("the quick brown fox", " jumps over the lazy dog", " is near the river"),
    ("a picture of", " a cat sitting on a mat", " two people near the river please"),
    ("what is the answer?", " the answer is 42", " the box is [0.1, 0.2, 0.5, 0.9]"),
    ("user: describe the picture", " a red bicycle near the park", " a fox"),
]

# (TRL loss_type list, extra DPOConfig / DPOSettings keywords): every TRL 1.13 loss type, a weighted mix and the
# f-divergences TRL offers.
CASES = [([t], {"label_smoothing": 1e-3} if t == "exo_pair" else {}) for t in LOSS_TYPES] + [
    (["robust"], {"label_smoothing": 0.1}),
    (["aot"], {"label_smoothing": 0.2}),
    (["aot_unpaired"], {"label_smoothing": 0.2}),
    (["discopop"], {"discopop_tau": 0.5, "beta": 0.3}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
    (["sigmoid"], {"f_divergence_type": "js_divergence"}),
    (["hinge"], {"f_divergence_type": "forward_kl", "beta": 0.5}),
    (["ipo"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
]


def _case_id(case):
    types, kw = case
    return "+".join(types) + "".join(f"-{k}={v}" for k, v in kw.items() if k != "loss_weights")


def _tokenized(tok):
    """Token ids as TRL 1.13 prepares a non-conversational row: EOS text appended to each completion, then
    `prompt` and `prompt + completion` tokenized separately (this tokenizer adds no BOS) and the completion
    taken as what follows the prompt's tokens."""
    out = []
    for prompt, chosen, rejected in ROWS:
        p = tok(prompt)["input_ids"]
        c = tok(prompt + chosen + tok.eos_token)["input_ids"]
        r = tok(prompt + rejected + tok.eos_token)["input_ids"]
        assert c[:len(p)] == p and r[:len(p)] == p, f"prompt {prompt!r} does not tokenize as a prefix"
        out.append((p, c[len(p):], r[len(p):]))
    return out


def _batch(rows, pad_id):
    """[chosen rows; rejected rows], right-padded, with the completion mask (TRL's collator layout)."""
    seqs = [(p + c, len(p)) for p, c, _ in rows] + [(p + r, len(p)) for p, _, r in rows]
    t = max(len(s) for s, _ in seqs)
    ids = np.full((len(seqs), t), pad_id, np.int32)
    cmask = np.zeros((len(seqs), t), np.int32)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, :len(s)] = s
        cmask[i, n_prompt:len(s)] = 1
    return ids, cmask


def _mm_logps(hf_dir, ids, cmask):
    """Summed completion log-probs and token counts of each row under the mm-converted LLM (float32)."""
    from mm.convert.registry import load
    from mm.losses import completion_logprobs, next_token_targets
    from mm.models.llm import LLM

    config, params = load(hf_dir)
    hidden = LLM(config).apply({"params": params}, jnp.asarray(ids), return_hidden=True)[0]
    kernel = params["embed_tokens"]["embedding"].T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    labels, mask = next_token_targets(jnp.asarray(ids), jnp.asarray(cmask))
    return completion_logprobs(hidden, jnp.asarray(kernel), labels, mask, chunk_size=16)


def _pairs(policy, ref):
    (lp, n), (lr, _) = policy, ref
    b = lp.shape[0] // 2
    return PairLogps(lp[:b], lp[b:], lr[:b], lr[b:], n[:b], n[b:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.hf_models import make_llama
    from tests.helpers.tokenizer import make_tokenizer

    tmp = tmp_path_factory.mktemp("dpo")
    a, b = make_llama(tmp / "a", seed=1), make_llama(tmp / "b", seed=2)  # same shape, different weights
    tok = make_tokenizer()
    rows = _tokenized(tok)
    ids, cmask = _batch(rows, tok.pad_token_id)
    la, lb = _mm_logps(a, ids, cmask), _mm_logps(b, ids, cmask)
    return {"a": a, "b": b, "tok": tok, "rows": rows, "ab": _pairs(la, lb), "aa": _pairs(la, la)}


@pytest.fixture(scope="module")
def trl_eval(setup, tmp_path_factory):
    """One `DPOTrainer(...).evaluate()` per config (loss settings live in the trainer's config), all rows in one
    eval batch; A the model, B the ref_model, CPU float32."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.helpers.hf_models import load_hf

    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ROWS])
    model, ref = load_hf(setup["a"]), load_hf(setup["b"])
    out = tmp_path_factory.mktemp("trl")
    seen = []

    def run(loss_type, kw):
        args = DPOConfig(output_dir=str(out), per_device_eval_batch_size=len(ROWS), bf16=False, use_cpu=True,
                         report_to=[], max_length=None, loss_type=list(loss_type), **kw)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, eval_dataset=data,
                             processing_class=setup["tok"])
        if not seen:  # the token split mm scores is the one TRL prepared
            got = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in trainer.eval_dataset]
            assert got == setup["rows"]
            seen.append(True)
        return trainer.evaluate()

    return run


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_metrics_equal_trl_evaluate(setup, trl_eval, case):
    loss_type, kw = case
    want = trl_eval(loss_type, kw)
    settings = DPOSettings(loss_type=tuple(loss_type), **kw)
    loss, got = jax.jit(preference_loss, static_argnums=1)(setup["ab"], settings)
    worst = {}
    for key in ("loss",) + METRICS:
        worst[key] = _rel(got[key], want[f"eval_{key}"])
    print(f"{_case_id(case)}: relative difference to TRL: loss {worst['loss']:.2e}, max over metrics "
          f"{max(worst.values()):.2e} ({max(worst, key=worst.get)})")
    assert max(worst.values()) <= 1e-4, (worst, {k: float(v) for k, v in got.items()})
    # a non-degenerate check: rewards differ between rows and not all pairs fall on one side
    assert 0.0 < float(got["rewards/accuracies"]) < 1.0


@pytest.mark.parametrize("loss_type,want", [("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0),
                                            ("ipo", 25.0)])
def test_policy_equals_reference_literals(setup, loss_type, want):
    for kw in ({}, {"label_smoothing": 0.2}):  # smoothing leaves these literals unchanged
        loss, m = preference_loss(setup["aa"], DPOSettings(loss_type=loss_type, **kw))
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)
        assert float(m["rewards/margins"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0  # strict >


def test_sigmoid_label_smoothing_is_cdpo_and_grad():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 3, 5), jnp.float32) for _ in range(4))
    beta, eps = 0.1, 0.25
    d = beta * ((np.asarray(pc) - np.asarray(rc)) - (np.asarray(pr) - np.asarray(rr)))
    log_sig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    want = np.mean(-(1 - eps) * log_sig(d) - eps * log_sig(-d))
    s = DPOSettings(label_smoothing=eps)
    loss = preference_loss(PairLogps(pc, pr, rc, rr), s)[0]
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    # d loss / d policy_chosen = beta * ((1 - eps) * (sigmoid(d) - 1) + eps * sigmoid(d)) / B
    g = jax.grad(lambda x: preference_loss(PairLogps(x, pr, rc, rr), s)[0])(pc)
    sig = 1 / (1 + np.exp(-d))
    np.testing.assert_allclose(g, beta * ((1 - eps) * (sig - 1) + eps * sig) / 5, rtol=1e-5, atol=1e-8)


def test_weighted_sum_of_loss_types(setup):
    s = DPOSettings(loss_type=("sigmoid", "ipo", "sppo_hard"), loss_weights=(0.5, 2.0, 0.1))
    per = per_sequence_losses(setup["ab"], s)
    loss = preference_loss(setup["ab"], s)[0]
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(per["sigmoid"]) + 2.0 * np.mean(per["ipo"])
                               + 0.1 * np.mean(per["sppo_hard"]), rtol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"loss_type": "dpo"}, "unknown"),
    ({"loss_type": ("sigmoid", "ipo"), "loss_weights": (1.0,)}, "loss_weights"),
    ({"loss_type": "exo_pair"}, "exo_pair"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "robust"),
    ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "bco_pair"),
    ({"f_divergence_type": "kl"}, "f_divergence_type"),
    ({"beta": 0.0}, "beta"),
])
def test_bad_settings_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        DPOSettings(**kw)


def test_missing_token_counts_and_shapes_raise():
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match="chosen_tokens"):
        preference_loss(PairLogps(z, z, z, z), DPOSettings(loss_type="ipo"))
    with pytest.raises(ValueError, match=r"\[B\] shape"):
        preference_loss(PairLogps(z, jnp.zeros(2), z, z))
