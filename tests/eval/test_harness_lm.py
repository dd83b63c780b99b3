"""The lm-evaluation-harness model `mm` on local tasks (YAML over generated JSON; no hub): every per-item
answer equals `LLMHandle.logits` / `generate` called directly on one unpadded prompt, the IAA text workflow
scores exactly what its base LLM scores (the same floats, item for item), and
`mm-eval lm-eval` (lm-eval's own command line) runs the model by name. Needs the `eval` extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # collected only where the eval extra is installed (conftest.py)
import numpy as np
import pytest

pytestmark = pytest.mark.eval

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.eval_tasks import write_lm_eval_tasks
    from tests.helpers.vlm_dirs import tiny_llm_and_iaa

    d = tmp_path_factory.mktemp("harness_lm")
    llm, iaa = tiny_llm_and_iaa(d / "models")
    return llm, iaa, write_lm_eval_tasks(d / "tasks")


def _evaluate(model_args, include):
    from lm_eval.tasks import TaskManager

    import mm.eval.harness_lm  # noqa: F401  (registers "mm")
    from tests.helpers.eval_tasks import TASKS

    return lm_eval.simple_evaluate(model="mm", model_args=model_args, tasks=list(TASKS), log_samples=True,
                                   task_manager=TaskManager(include_path=str(include)))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _direct_ll(h, ctx, cont):
    """log p(cont | BOS ctx) and greedy-ness from one unpadded forward of the handle."""
    tok = h.tokenizer
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    cont_ids = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
    ids = [tok.bos_token_id] + c + cont_ids
    lp = _log_softmax(h.logits([ids])[0])
    pos = range(len(ids) - len(cont_ids) - 1, len(ids) - 1)
    pairs = list(zip(pos, cont_ids))
    return sum(lp[p, t] for p, t in pairs), all(int(np.argmax(lp[p])) == t for p, t in pairs)


def test_answers_equal_the_handle_and_iaa_text_equals_base(setup):
    import mm

    llm, iaa, include = setup
    base = _evaluate(f"path={llm},batch_size=4", include)
    text = _evaluate(f"path={iaa},workflow=text,batch_size=4", include)
    for task, res in base["results"].items():
        assert {k: v for k, v in res.items() if "," in k} == {k: v for k, v in text["results"][task].items()
                                                              if "," in k}, task
        assert [s["resps"] for s in base["samples"][task]] == [s["resps"] for s in text["samples"][task]], task

    h = mm.from_pretrained(llm)
    tok = h.tokenizer
    mc = base["samples"]["mm_tiny_mc"]
    assert len(mc) == 4
    for s in mc:
        for (ctx, cont), [(ll, greedy)] in zip(s["arguments"], s["resps"]):
            want, want_greedy = _direct_ll(h, ctx, cont)
            assert ll == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy
        assert s["acc"] == float(int(np.argmax([r[0][0] for r in s["resps"]])) == s["doc"]["answer"])
    assert base["results"]["mm_tiny_mc"]["acc,none"] == np.mean([s["acc"] for s in mc])

    for s in base["samples"]["mm_tiny_gen"]:
        ctx, kw = s["arguments"][0]
        ids = [tok.bos_token_id] + tok(ctx, add_special_tokens=False)["input_ids"]
        new = h.generate([ids], max_new_tokens=kw["max_gen_toks"], stop_tokens=[tok.eos_token_id]).tolist()[0]
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        want = tok.decode(new, skip_special_tokens=True)
        for u in kw["until"]:
            want = want.split(u)[0]
        assert s["resps"] == [[want]]

    for s in base["samples"]["mm_tiny_ppl"]:
        ids = [tok.bos_token_id] + tok(s["arguments"][0][0], add_special_tokens=False)["input_ids"]
        lp = _log_softmax(h.logits([ids])[0])
        assert s["resps"][0][0] == pytest.approx(sum(lp[p, ids[p + 1]] for p in range(len(ids) - 1)), rel=1e-5)


def test_rolling_windows_cover_every_token_once(setup):
    """With a window shorter than the text, rolling log-likelihood is a sum over disjoint windows, each with the
    most context that fits; every token is scored once."""
    from mm.eval.text_model import TextModel

    llm, _, _ = setup
    t = TextModel(str(llm), max_length=8, batch_size=2)
    text = "there are two people and a bicycle near the river, describe the scene in one sentence"
    ids = t.encode(text)
    wins = t.rolling_windows(text)
    assert [x for _, cont in wins for x in cont] == ids and len(wins) > 2
    full, k = [t.bos] + ids, 0
    for ctx, cont in wins:  # the context is what precedes the window in the text, as much as fits
        assert ctx == full[k + 1 - len(ctx):k + 1] and len(ctx) + len(cont) == min(9, k + 1 + len(cont))
        k += len(cont)


def test_lm_eval_command_line_runs_the_model_by_name(setup, tmp_path):
    llm, _, include = setup
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "launch.eval", "lm-eval", "--model", "mm", "--model_args",
                        f"path={llm},batch_size=4", "--tasks", "mm_tiny_mc", "--include_path", str(include),
                        "--output_path", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]["mm_tiny_mc"]
    assert res["acc,none"] == _evaluate(f"path={llm},batch_size=4", include)["results"]["mm_tiny_mc"]["acc,none"]


def test_compare_base_and_iaa_in_one_report(setup, tmp_path):
    """`mm-eval compare`: lm-eval tasks on the base and the IAA text workflow (identical), a VLM benchmark on the
    IAA image workflow, one report; the command exits 0 when identical."""
    from PIL import Image

    llm, iaa, include = setup
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "img" / "a.png")
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text("".join(json.dumps({"question_id": k, "image": "a.png", "text": f"is there a cat {k}?",
                                        "label": "yes"}) + "\n" for k in range(2)))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "launch.eval", "compare", "--base", str(llm), "--model", str(iaa),
                        "--tasks", "mm_tiny_mc,mm_tiny_ppl", "--include-path", str(include), "--vlm-tasks",
                        f"pope={pope}@{tmp_path / 'img'}", "--out", str(tmp_path / "out"), "--batch-size", "4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "text workflow IDENTICAL to the base on 4 metrics" in r.stdout
    res = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert res["identical"] and res["items"] == {"mm_tiny_mc": [4, 4], "mm_tiny_ppl": [2, 2]}
    assert [(x["task"], x["metric"]) for x in res["text"]] == [
        ("mm_tiny_mc", "acc"), ("mm_tiny_ppl", "word_perplexity"), ("mm_tiny_ppl", "byte_perplexity"),
        ("mm_tiny_ppl", "bits_per_byte")]
    assert all(x["base"] == x["iaa_text"] for x in res["text"])
    assert res["vlm"]["pope"]["workflow"] == "mm" and res["vlm"]["pope"]["samples"] == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**identical to**" in md and "## pope (workflow mm)" in md
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
