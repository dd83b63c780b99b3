"""Preference (DPO) training in mm-train (`data.kind = "preference"`, `model.kind = "llm"`).

The acceptance check trains a tiny random HF Llama (policy A, reference B, same shape) for 5 steps with TRL
1.13's `DPOTrainer` and with `mm.train.loop.train` (init.llm_checkpoint = A, dpo.reference = B) on the same
rows (the whole set each step, AdamW at a constant lr, no clipping, no weight decay) and compares the per-step
losses and reward margins; the token ids TRL prepares are checked against the ones mm's pipeline makes. With
policy == reference (dpo.reference = "") the first step's sigmoid loss is ln 2, and a run resumed from a
mid-run checkpoint (the reference rebuilt from the init sources) gives the uninterrupted run's metrics. IAA and
LLaVA train on image pairs with one ViT pass per image (two when the ViT trains: the reference keeps its own).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mm.config import ConfigError
from mm.sharding import global_batch
from mm.train import schema as tcfg
from mm.train.schema import base_config
from mm.train.from_checkpoints import llm_section

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command

ROWS = [  # prompt / chosen / rejected
    ("what is in the image?", "a dog playing in the park", "a cat sitting on a red mat"),
    ("describe the scene in one sentence", "there are two people and a bicycle", "the lazy dog"),
    ("the quick brown fox", "jumps over the lazy dog", "is near the river"),
    ("a picture of", "a cat sitting on a mat", "two people near the river please"),
]
STEPS, LR, SEQ = 5, 1e-3, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.hf_models import make_llama
    from tests.helpers.tokenizer import make_tokenizer

    tmp = tmp_path_factory.mktemp("dpo_train")
    a, b = make_llama(tmp / "a", seed=1), make_llama(tmp / "b", seed=2)  # same shape, different weights
    tok = make_tokenizer()
    tok.save_pretrained(str(tmp / "tok"))
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": p}], "chosen": c, "rejected": r}
            for i, (p, c, r) in enumerate(ROWS)]
    (tmp / "pref.json").write_text(json.dumps(rows))
    return {"a": a, "b": b, "tok": tok, "tok_dir": str(tmp / "tok"), "data": str(tmp / "pref.json")}


def _cfg(setup, reference: str = "", steps: int = STEPS):
    c = base_config()
    c.model.kind = "llm"
    c.model.llm.update(llm_section(setup["a"]))
    c.init.update(dict(llm_checkpoint=str(setup["a"]), prng_impl="unsafe_rbg"))
    c.data.update(dict(kind="preference", path=setup["data"], tokenizer=setup["tok_dir"], template="chat",
                       pack=False))
    c.dpo.update(dict(reference=reference, beta=0.1, loss_type=["sigmoid"]))
    c.train.update(dict(steps=steps, batch_size=len(ROWS), seq_len=SEQ, log_every=1))
    c.optim.update(dict(lr=LR, warmup_frac=0.0, min_lr_ratio=1.0, weight_decay=0.0, clip_norm=0.0))
    c.checkpoint.update(dict(every=0, use_async=False))
    c.metrics.tensorboard = False
    return c


def _rows(workdir):
    return {r["step"]: r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def _mm_token_ids(setup):
    """(prompt ids, chosen completion ids, rejected completion ids) per row as the trainer's source makes them:
    the supervised run of each half (the answer and its end-of-turn token) and everything before it."""
    from mm.train.grain_source import GrainSource

    src = GrainSource(_cfg(setup))
    try:
        batch = next(src)
    finally:
        src.close()
    out = {}
    for r in range(len(ROWS)):
        parts = []
        for half in ("chosen", "rejected"):
            ids, mask = batch[f"{half}/input_ids"][0, r], batch[f"{half}/loss_mask"][0, r]
            sup = np.flatnonzero(mask) + 1  # loss_mask[t] scores the token at t + 1
            assert np.array_equal(sup, np.arange(sup[0], sup[-1] + 1)), "one contiguous completion"
            parts.append((ids[:sup[0]].tolist(), ids[sup[0]:sup[-1] + 1].tolist()))
        (p, c), (p2, rj) = parts
        assert p == p2, "both halves of a pair share the prompt"
        out[tuple(p)] = (p, c, rj)
    return out


def _trl_train(setup, tmp_path, loss_type="sigmoid", model=None, ref_model="b", lr=LR):
    """TRL's per-step logged loss and reward margin; prompts are the chat template's rendering with the
    generation header, completions ' ' + answer (TRL appends the EOS text), so the ids equal mm's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.helpers.hf_models import load_hf

    tok = setup["tok"]
    data = Dataset.from_list([{"prompt": tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                 add_generation_prompt=True),
                               "chosen": " " + c, "rejected": " " + r} for p, c, r in ROWS])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), max_steps=STEPS,
                     learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, max_length=None, beta=0.1,
                     loss_type=[loss_type], seed=0)
    trainer = DPOTrainer(model=load_hf(setup["a"]) if model is None else model,
                         ref_model=load_hf(setup[ref_model]) if ref_model else None, args=args, train_dataset=data,
                         processing_class=tok)
    trl_ids = {tuple(e["prompt_ids"]): (e["prompt_ids"], e["chosen_ids"], e["rejected_ids"])
               for e in trainer.train_dataset}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return trl_ids, {h["step"]: (h["loss"], h["rewards/margins"]) for h in logged}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_losses_equal_trl_dpo_trainer(setup, tmp_path, loss_type):
    from mm.train.loop import train

    mm_ids = _mm_token_ids(setup)
    trl_ids, trl = _trl_train(setup, tmp_path, loss_type)
    assert mm_ids == trl_ids, "mm's pipeline and TRL tokenise the pairs differently"

    c = _cfg(setup, reference=str(setup["b"]))
    c.dpo.loss_type = [loss_type]
    res = train(c, tmp_path / "mm", devices=jax.devices()[:1])
    rows = _rows(tmp_path / "mm")
    assert sorted(trl) == list(range(1, STEPS + 1)), trl
    diffs = [abs(res.losses[s] - trl[s][0]) for s in range(1, STEPS + 1)]
    margins = [abs(rows[s]["rewards/margins"] - trl[s][1]) for s in range(1, STEPS + 1)]
    print(f"{loss_type}: per-step loss mm / TRL:", [(round(res.losses[s], 6), trl[s][0]) for s in range(1, STEPS + 1)])
    print(f"max |loss diff| {max(diffs):.2e}, max |margin diff| {max(margins):.2e}")
    assert max(diffs) <= 1e-3 and max(margins) <= 1e-3, (diffs, margins)
    # A and B differ, so step 1 is not at the policy == reference value, and training moves the loss
    at_start = {"sigmoid": math.log(2), "ipo": 25.0, "hinge": 1.0}[loss_type]
    assert abs(res.losses[1] - at_start) > 1e-2 and res.losses[STEPS] < res.losses[1] - 1e-3, res.losses


def test_lora_dpo_equals_trl_with_a_peft_model(setup, tmp_path):
    """LoRA DPO: TRL's DPOTrainer on a PEFT model (ref_model=None: the reference is the model with its adapters
    disabled) against mm-train with the same adapters at the start (PEFT's own init, read through
    init.lora_checkpoint) and `dpo.reference = ""`: the per-step losses and margins agree, and mm's step holds
    no reference copy at all."""
    from peft import LoraConfig, get_peft_model

    from mm.train import loop, preference
    from tests.helpers.hf_models import load_hf

    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(load_hf(setup["a"]), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=proj))
    peft_model.save_pretrained(str(tmp_path / "start"))  # A kaiming-uniform, B = 0
    lr = 1e-2
    _, trl = _trl_train(setup, tmp_path, model=peft_model, ref_model="", lr=lr)

    c = _cfg(setup, reference="")
    c.param_groups = [(r"layers_\d+/(self_attn|mlp)/.*", {"lora": {"rank": 4, "alpha": 16}}), (".*", "frozen")]
    c.init.lora_checkpoint = str(tmp_path / "start")
    c.optim.lr = lr
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    assert jax.tree.leaves(b.frozen[preference.REFERENCE_KEY]) == []  # adapters off: nothing to copy
    res = loop.train(c, tmp_path / "mm", devices=jax.devices()[:1])
    rows = _rows(tmp_path / "mm")
    diffs = [abs(res.losses[s] - trl[s][0]) for s in range(1, STEPS + 1)]
    margins = [abs(rows[s]["rewards/margins"] - trl[s][1]) for s in range(1, STEPS + 1)]
    print("LoRA sigmoid: per-step loss mm / TRL+PEFT:",
          [(round(res.losses[s], 6), trl[s][0]) for s in range(1, STEPS + 1)])
    print(f"max |loss diff| {max(diffs):.2e}, max |margin diff| {max(margins):.2e}")
    assert abs(res.losses[1] - math.log(2)) < 1e-6  # B = 0: the policy is its reference at step 1
    assert res.losses[STEPS] < math.log(2) - 1e-3, res.losses  # and training moves it
    assert max(diffs) <= 1e-3 and max(margins) <= 1e-3, (diffs, margins)


def test_reference_is_the_start_and_resume_matches(setup, tmp_path):
    from mm.train.loop import train

    one = jax.devices()[:1]
    c = _cfg(setup, steps=4)
    c.checkpoint.update(dict(every=2, keep=5))
    ref = train(c, tmp_path / "ref", devices=one)
    full = _rows(tmp_path / "ref")
    assert abs(ref.losses[1] - math.log(2)) < 1e-6, ref.losses  # policy == reference at step 1
    # (the policy and the reference forward compile to different fusions: equal up to float32 rounding)
    assert abs(full[1]["rewards/margins"]) < 1e-5 and abs(full[1]["rewards/chosen"]) < 1e-5, full[1]
    assert full[4]["rewards/margins"] > 0 and ref.losses[4] < ref.losses[1], (full[4], ref.losses)

    run = tmp_path / "run"  # "killed" after step 2's checkpoint
    shutil.copytree(tmp_path / "ref" / "checkpoints", run / "checkpoints")
    for p in (run / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > 2:
            shutil.rmtree(p)
    got = train(c, run, devices=one)
    assert sorted(got.losses) == [3, 4]
    resumed = _rows(run)
    for s in (3, 4):
        assert got.losses[s] == ref.losses[s], (s, got.losses, ref.losses)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert resumed[s][k] == full[s][k], (s, k)
    from mm.train.export import trained_params

    _, params, _ = trained_params(run)  # what an export (or mm-soup of DPO runs) writes: the policy alone
    assert "dpo_reference" not in params and "embed_tokens" in params, sorted(params)


def test_grad_accum_gives_the_same_losses_and_eval_runs(setup, tmp_path):
    """Two micro batches of two pairs each: the step's mean over its pairs (loss and metrics) equals one batch
    of four; the held-out DPO loss is logged as `eval_dpo` (on the training rows: after step 1's update it is
    below step 1's loss)."""
    from mm.train.loop import train

    one = jax.devices()[:1]
    c1, c2 = _cfg(setup, steps=2), _cfg(setup, steps=2)
    c2.optim.grad_accum = 2
    c2.train.update(dict(eval_every=1, eval_batches=1))
    c2.data.eval_path = setup["data"]
    r1, r2 = train(c1, tmp_path / "one", devices=one), train(c2, tmp_path / "two", devices=one)
    rows1, rows2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for s in (1, 2):
        assert abs(r1.losses[s] - r2.losses[s]) < 1e-5, (r1.losses, r2.losses)
        assert abs(rows1[s]["logps/chosen"] - rows2[s]["logps/chosen"]) < 1e-4, (rows1[s], rows2[s])
    evals = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in evals if r["kind"] == "eval_dpo"}
    assert sorted(evals) == [1, 2] and evals[1] < r2.losses[1], evals  # after one update the loss is lower


def test_step_flops_count_both_halves_and_the_reference(setup):
    """The analytic model FLOPs of a preference step (policy forward + backward on chosen and rejected rows,
    the reference's forward on both) against XLA's cost analysis of the compiled step."""
    from mm.train import flops as F
    from mm.train import loop
    from mm.train.grain_source import GrainSource

    c = _cfg(setup)
    c.init.llm_checkpoint = ""  # random, wide enough that the matmuls dominate XLA's count
    c.model.llm.update(dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_heads=4, num_kv_heads=2,
                            head_dim=64))
    c.train.seq_len = 64
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    src = GrainSource(c)
    try:
        x = next(src)
    finally:
        src.close()
    x.pop("example_id")
    xla = F.xla_flops(b.step_fn.lower(b.state, b.frozen, global_batch(x, b.batch_sharding, 1)).compile())
    assert abs(xla / b.flops["total"] - 1) < 0.10, (xla, b.flops)
    assert b.flops["forward"] == b.flops["backward"]  # everything trains: backward 2x the policy's forward


def test_precomputed_reference_gives_the_same_run_and_is_kept(setup, tmp_path):
    """dpo.precompute_reference: one pass of reference B over the training and the eval rows before step 1,
    kept in WORKDIR/reference_logps/; the run's losses, TRL metrics and eval losses equal the run that keeps B
    and runs its forward in every step; the step holds no reference params and counts no reference FLOPs;
    a resumed run reads the files, another reference is refused naming the file."""
    from mm.train import loop, preference

    one = jax.devices()[:1]
    (tmp_path / "eval.json").write_text(Path(setup["data"]).read_text())

    def cfg(precompute, steps=3, reference=str(setup["b"])):
        c = _cfg(setup, reference=reference, steps=steps)
        c.train.update(dict(eval_every=1, eval_batches=1))
        c.data.eval_path = str(tmp_path / "eval.json")
        c.dpo.precompute_reference = precompute
        c.checkpoint.update(dict(every=3, keep=2))
        return c

    live = loop.train(cfg(False), tmp_path / "live", devices=one)
    pre = loop.train(cfg(True), tmp_path / "pre", devices=one)
    rows_live, rows_pre = _rows(tmp_path / "live"), _rows(tmp_path / "pre")
    for s in (1, 2, 3):
        assert abs(live.losses[s] - pre.losses[s]) < 1e-5, (live.losses, pre.losses)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert abs(rows_live[s][k] - rows_pre[s][k]) < 1e-5, (s, k, rows_live[s][k], rows_pre[s][k])
    evals = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / w / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "eval_dpo"} for w in ("live", "pre")]
    assert sorted(evals[0]) == [1, 2, 3] and all(abs(evals[0][s] - evals[1][s]) < 1e-5 for s in evals[0]), evals
    files = {n: json.loads((tmp_path / "pre" / "reference_logps" / f"{n}.json").read_text()) for n in ("train", "eval")}
    assert sorted(files["train"]["logps"]) == ["r0", "r1", "r2", "r3"]
    assert files["eval"]["logps"] == files["train"]["logps"]
    assert all(c < 0 and r < 0 for c, r in files["train"]["logps"].values())

    b_pre, b_live = (loop.build(cfg(p), log=False, devices=one) for p in (True, False))
    assert preference.REFERENCE_KEY not in b_pre.frozen and preference.REFERENCE_KEY in b_live.frozen
    assert b_pre.flops["backward"] == b_live.flops["backward"]
    assert abs(b_live.flops["forward"] - 2 * b_pre.flops["forward"]) < 1e-6 * b_live.flops["forward"]

    mtime = (tmp_path / "pre" / "reference_logps" / "train.json").stat().st_mtime_ns
    more = loop.train(cfg(True, steps=4), tmp_path / "pre", devices=one)  # resumes after step 3's checkpoint
    assert sorted(more.losses) == [4]
    assert (tmp_path / "pre" / "reference_logps" / "train.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"reference_logps/train\.json: reference log-probs of another run "
                                          r"\(reference differ"):
        loop.train(cfg(True, steps=5, reference=""), tmp_path / "pre", devices=one)

    start = loop.train(cfg(True, steps=1, reference=""), tmp_path / "start", devices=one)
    assert abs(start.losses[1] - math.log(2)) < 1e-5, start.losses  # the start scored itself: ln 2 at step 1


@pytest.mark.parametrize("change, key", [
    (dict(loss_type=["nope"]), "dpo.loss_type"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "dpo.loss_weights"),
    (dict(loss_weights=["x"]), "dpo.loss_weights"),
    (dict(beta=0.0), "dpo.beta"),
    (dict(label_smoothing=1.5), "dpo.label_smoothing"),
    (dict(reference="/nonexistent/ref"), "dpo.reference"),
])
def test_dpo_config_errors_name_the_key(setup, change, key):
    c = _cfg(setup)
    c.dpo.update(change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tcfg.validate(c)


def test_cli_exits_2_naming_the_dpo_key(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/tiny_llm.py:full",
                        f"--workdir={tmp_path}/w", "--config.dpo.beta=0.0"], cwd=root, capture_output=True,
                       text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert (r.returncode, r.stderr) == (2, "mm-train: error: config key dpo.beta must be positive, got 0.0\n"), r.stderr
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def image_pairs(tmp_path_factory):
    """Four rows of the tiny LLaVA set (a step's batch: every step sees them all) as preference rows: the prompt,
    its own answer (chosen) and the next row's (rejected)."""
    from tests.train.helpers_train import write_tiny_llava

    d = tmp_path_factory.mktemp("dpo_images")
    path, root, tok = write_tiny_llava(d)
    rows = [r for r in json.loads(Path(path).read_text()) if r["id"] != "planted_corrupt"][:4]  # one batch
    pref = [{**{k: v for k, v in r.items() if k != "conversations"}, "conversations": r["conversations"][:1],
             "chosen": r["conversations"][1]["value"],
             "rejected": rows[(i + 1) % len(rows)]["conversations"][1]["value"]} for i, r in enumerate(rows)]
    (d / "pref.json").write_text(json.dumps(pref))
    return str(d / "pref.json"), root, tok


def _mm_cfg(image_pairs, kind):
    from tests.train.helpers_train import tiny_iaa_llava

    c = tiny_iaa_llava(*image_pairs)  # the mm branch trains; base LLM and ViT (run in the step) frozen
    if kind == "llava":  # LLaVA's instruction stage: projector and LLM train, the ViT is frozen
        c.model.kind = "llava"
        c.param_groups = [("(projector|llm)/.*", 1.0), ("vision/.*", "frozen")]
    c.data.kind = "preference"
    c.train.update(dict(steps=3, log_every=1))
    c.checkpoint.update(dict(every=0, use_async=False))
    return c


def _first_micro_batch(c):
    from mm.train.grain_source import GrainSource

    src = GrainSource(c)
    try:
        x = next(src)
    finally:
        src.close()
    return {k: jax.numpy.asarray(v[0]) for k, v in x.items() if k != "example_id"}


def _assert_vit_passes(b, mb, monkeypatch, want):
    """Traces the step's loss and counts the ViT forwards in it."""
    from mm.models import vision
    from mm.train import param_groups as pg

    calls = []
    real = vision.image_features
    with monkeypatch.context() as m:
        m.setattr(vision, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
        jax.make_jaxpr(b.model.loss)(pg.merge(b.state["params"], b.frozen), mb)
    assert len(calls) == want, calls


def test_a_trained_vit_gives_the_reference_its_own_features(image_pairs, monkeypatch):
    from mm.train import loop

    c = _mm_cfg(image_pairs, "llava")
    c.param_groups = [(".*", 1.0)]  # the ViT trains too: the reference keeps its starting ViT
    b = loop.build(c, log=False, devices=jax.devices()[:1])
    _assert_vit_passes(b, _first_micro_batch(c), monkeypatch, 2)


@pytest.mark.parametrize("kind", ["iaa", "llava"])
def test_multimodal_trains_with_one_vit_pass_per_image(image_pairs, tmp_path, monkeypatch, kind):
    """IAA's trained workflow / LLaVA on image pairs: ln 2 at the start, the loss falls; the step's loss traces
    the ViT once (features shared by both halves, policy and reference); each half's summed log-probs equal the
    SFT loss's materialised-logits NLL of that half's rows."""
    from mm.train import loop, param_groups as pg, preference

    one = jax.devices()[:1]
    c = _mm_cfg(image_pairs, kind)
    res = loop.train(c, tmp_path / kind, devices=one)
    assert abs(res.losses[1] - math.log(2)) < 1e-5 and res.losses[3] < res.losses[1], res.losses

    b = loop.build(c, log=False, devices=one)
    mb = _first_micro_batch(c)
    assert mb["chosen/tile_mask"].any() and np.array_equal(mb["chosen/pixel_values"], mb["rejected/pixel_values"])
    params = pg.merge(b.state["params"], b.frozen)
    _assert_vit_passes(b, mb, monkeypatch, 1)

    policy, _ = preference.reference_params(params)
    # the kind's SFT loss (train.loss_chunk 0: materialised logits), without the preference wrapper of build()
    sft = loop.models._train_model(c).loss
    for half in preference.HALVES:
        plain = {k.split("/", 1)[1]: v for k, v in mb.items() if k.startswith(half + "/")}
        lp, n = b.model.sequence_logps(policy, plain)
        for r in range(lp.shape[0]):
            row = {k: v[r:r + 1] for k, v in plain.items()}
            nll, cnt = sft(policy, row)
            assert abs(float(lp[r]) + float(nll)) < 1e-4 * max(1.0, abs(float(nll))), (half, r, lp[r], nll)
            assert float(n[r]) == float(cnt) > 0


def test_iaa_precomputed_reference_equals_the_live_one(image_pairs, tmp_path):
    """The IAA branch on image pairs with the reference precomputed (the ViT's features of the pass are the
    step's): the same losses as the run whose step holds the branch's starting copy."""
    from mm.train import loop

    one = jax.devices()[:1]
    live = loop.train(_mm_cfg(image_pairs, "iaa"), tmp_path / "live", devices=one)
    c = _mm_cfg(image_pairs, "iaa")
    c.dpo.precompute_reference = True
    pre = loop.train(c, tmp_path / "pre", devices=one)
    assert sorted(pre.losses) == [1, 2, 3]
    assert all(abs(live.losses[s] - pre.losses[s]) < 1e-5 for s in (1, 2, 3)), (live.losses, pre.losses)
    assert len(json.loads((tmp_path / "pre" / "reference_logps" / "train.json").read_text())["logps"]) == 4


def test_lora_dpo_on_iaa_insertion_layers_and_the_vit(image_pairs, tmp_path, monkeypatch):
    """DPO of an IAA branch through LoRA on its insertion layers and on the ViT (projector fully trained): ln 2
    at the start, the loss falls; the reference holds a copy of the projector alone (adapters are off in it), and
    because the ViT is adapted the reference runs its own (un-adapted) ViT; precomputing the reference gives the
    same losses."""
    from mm.train import loop, param_groups as pg, preference

    one = jax.devices()[:1]

    def cfg(precompute):
        c = _mm_cfg(image_pairs, "iaa")
        lo = {"lora": {"rank": 4, "alpha": 8}}
        c.param_groups = [(r"mm/layers_\d+/(self_attn|mlp)/.*", lo), (r"vision/encoder/layers_\d+/.*", lo),
                          ("mm/projector/.*", 1.0), (".*", "frozen")]
        c.dpo.precompute_reference = precompute
        return c

    live = loop.train(cfg(False), tmp_path / "live", devices=one)
    pre = loop.train(cfg(True), tmp_path / "pre", devices=one)
    assert abs(live.losses[1] - math.log(2)) < 1e-5 and live.losses[3] < live.losses[1], live.losses
    assert all(abs(live.losses[s] - pre.losses[s]) < 1e-5 for s in (1, 2, 3)), (live.losses, pre.losses)
    b = loop.build(cfg(False), log=False, devices=one)
    ref = pg.flatten(b.frozen[preference.REFERENCE_KEY])
    assert ref and all(k.startswith("mm/projector/") for k in ref), sorted(ref)
    _assert_vit_passes(b, _first_micro_batch(cfg(False)), monkeypatch, 2)
