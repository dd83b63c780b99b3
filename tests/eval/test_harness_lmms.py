"""The lmms-eval model `mm`, found by name through the `lmms_eval.models` entry point, on local tasks (YAML +
a `doc_to_visual` over generated images and JSON; no hub): its short answers equal `VLMHandle.generate` called
directly on each item alone (prompt from the tokenizer's chat template, pixels padded to square by hand), its
multiple-choice losses (lmms-eval's convention: mean NLL per target token, the argmin wins) equal one unpadded
`VLMHandle.logits` each; `python -m lmms_eval --model mm`
runs. Needs the `eval` extra installed with mm (the entry point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.eval  # collected only where the eval extra is installed (conftest.py)

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.eval_tasks import write_lmms_eval_tasks
    from tests.helpers.vlm_dirs import tiny_iaa_vlm_with_tokenizer

    d = tmp_path_factory.mktemp("harness_lmms")
    return tiny_iaa_vlm_with_tokenizer(d / "iaa"), write_lmms_eval_tasks(d / "tasks")


def _inputs(h, question, image_path):
    from mm.data import images as img_lib
    from mm.ppl import processor_for

    tok, proc = h.tokenizer, processor_for(h)
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + question}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    image = Image.open(image_path).convert("RGB")
    return ids, img_lib.preprocess(img_lib.pad_to_square(image, img_lib.mean_fill(proc)), proc)[None]


def test_answers_equal_the_handle(setup):
    import mm
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tests.helpers.eval_tasks import LMMS_TASKS

    model, include = setup
    res = simple_evaluate(model="mm", model_args=f"path={model},batch_size=2", tasks=list(LMMS_TASKS),
                          task_manager=TaskManager(include_path=str(include)), log_samples=True)
    h = mm.from_pretrained(model)
    tok = h.tokenizer
    stops = sorted({tok.eos_token_id, *h.config.lm.llm.eos_token_id})
    vqa = res["samples"]["mm_tiny_vqa"]
    assert len(vqa) == 3
    for s in vqa:
        ids, px = _inputs(h, s["doc"]["question"], s["doc"]["image"])
        new = h.generate([ids], pixel_values=[px], max_new_tokens=5, stop_tokens=stops)[0].tolist()
        new = new[:min([new.index(t) for t in stops if t in new], default=len(new))]
        assert s["resps"] == [[tok.decode(new, skip_special_tokens=True).strip().split(".")[0]]]
    vmc = res["samples"]["mm_tiny_vmc"]
    for s in vmc:
        ids, px = _inputs(h, s["doc"]["question"], s["doc"]["image"])
        lls = []
        for choice, [(ll, greedy)] in zip(s["doc"]["choices"], s["resps"]):
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            logits = h.logits([ids + cont], pixel_values=[px]).astype(np.float64)[0]
            lp = logits - logits.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            n = len(logits)
            want = -sum(lp[n - len(cont) - 1 + k, t] for k, t in enumerate(cont)) / len(cont)
            assert ll == pytest.approx(want, rel=1e-6)
            assert greedy == all(int(np.argmax(lp[n - len(cont) - 1 + k])) == t for k, t in enumerate(cont))
            lls.append(ll)
        assert s["acc"] == float(int(np.argmin(lls)) == s["doc"]["answer"])
    assert res["results"]["mm_tiny_vmc"]["acc,none"] == pytest.approx(np.mean([s["acc"] for s in vmc]))


def test_lmms_eval_command_line_finds_mm(setup, tmp_path):
    model, include = setup
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "mm", "--model_args",
                        f"path={model},batch_size=2", "--tasks", "mm_tiny_vmc", "--include_path", str(include),
                        "--batch_size", "1",
                        "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    files = list((tmp_path / "out").rglob("*results*.json"))
    assert files, list((tmp_path / "out").rglob("*"))
    assert "acc,none" in json.loads(files[0].read_text())["results"]["mm_tiny_vmc"]
