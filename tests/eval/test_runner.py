"""mm-eval's runner on a tiny IAA VLM: its per-sample answers are exactly `VLMHandle.generate` called directly
(one prompt at a time, prompt from the tokenizer's chat template, pixels padded to square and normalised by
hand), it resumes an interrupted run and shards over processes without changing a record, grounding uses the
`g` branch, and it writes the summary, Markdown and PNG report; the CLI's bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(28, 28), (40, 28), (28, 50), (60, 33), (30, 30)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.vlm_dirs import tiny_iaa_vlm_with_tokenizer

    d = tmp_path_factory.mktemp("eval_runner")
    model = tiny_iaa_vlm_with_tokenizer(d / "model")
    (d / "img").mkdir()
    rs = np.random.RandomState(0)
    for k, size in enumerate(SIZES):
        Image.fromarray(rs.randint(0, 255, (size[1], size[0], 3), np.uint8)).save(d / "img" / f"im{k}.png")
    pope = d / "coco_pope_random.json"
    pope.write_text("".join(json.dumps({"question_id": k, "image": f"im{k}.png", "text": f"is there a dog {k}?",
                                        "label": "yes" if k % 2 else "no"}) + "\n" for k in range(len(SIZES))))
    return model, pope, d / "img"


def _direct(model, items, image_root, workflow, max_new):
    """Each item alone through the handle: the reference the runner's batched answers must equal."""
    import mm
    from mm.data import images as img_lib
    from mm.ppl import processor_for

    h = mm.from_pretrained(model)
    tok, proc = h.tokenizer, processor_for(h)
    stops = sorted({tok.eos_token_id, *h.config.lm.llm.eos_token_id})
    out = []
    for it in items:
        text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + it.question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(h.image_token) == 1
        image = Image.open(os.path.join(image_root, it.image)).convert("RGB")
        px = img_lib.preprocess(img_lib.pad_to_square(image, img_lib.mean_fill(proc)), proc)[None]
        new = h.generate([ids], pixel_values=[px], workflow=workflow, max_new_tokens=max_new, stop_tokens=stops)[0]
        keep = []
        for t in new.tolist():
            if t in stops:
                break
            keep.append(t)
        out.append(tok.decode(keep, skip_special_tokens=True).strip())
    return out


def _samples(out):
    return [json.loads(line) for line in (Path(out) / "samples.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_runner_answers_equal_the_handle_and_resume_and_shards(setup, tmp_path):
    from mm.eval import pope, runner

    model, data, img = setup
    full = runner.run("pope", model, str(data), out_dir=str(tmp_path / "full"), image_root=str(img), batch_size=2,
                      chunk_rows=2, progress=False)
    items = pope.read(str(data))
    got = _samples(tmp_path / "full")
    assert [r["prediction"] for r in got] == _direct(model, items, img, "mm", 8)
    assert len({r["prediction"] for r in got}) > 1  # the random model answers something, and not one thing
    assert [r["image_size"] for r in got] == [list(s) for s in SIZES]
    assert full["samples"] == 5 and full["workflow"] == "mm"
    assert full["tables"]["splits"][0] == {"split": "random", **pope.metrics(
        [pope.pope_yes_no(r["prediction"]) for r in got], [r["label"] for r in got])}
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(full))
    md = (tmp_path / "full" / "report.md").read_text()
    assert "| split | accuracy | precision | recall | f1 | yes_ratio | n |" in md and "report.png" in md
    assert (tmp_path / "full" / "report.png").read_bytes()[:4] == b"\x89PNG"

    # interrupted after one chunk of 2, then finished: 3 chunk files, the same records and summary
    part = tmp_path / "resumed"
    assert runner.run("pope", model, str(data), out_dir=str(part), image_root=str(img), batch_size=2, chunk_rows=2,
                      stop_after_chunks=1, progress=False) is None
    assert not (part / "samples.jsonl").exists() and len(list(part.glob("samples-p0-*.jsonl"))) == 1
    again = runner.run("pope", model, str(data), out_dir=str(part), image_root=str(img), batch_size=2, chunk_rows=2,
                       progress=False)
    assert len(list(part.glob("samples-p0-*.jsonl"))) == 3
    assert _samples(part) == got and again == full

    # two processes' shards (items 0::2 and 1::2), process 1 first: process 0 merges the same result
    sh = tmp_path / "sharded"
    assert runner.run("pope", model, str(data), out_dir=str(sh), image_root=str(img), process=1, processes=2,
                      progress=False) is None
    assert [json.loads(x)["index"] for x in (sh / "samples-p1-00000.jsonl").read_text().splitlines()] == [1, 3]
    assert runner.run("pope", model, str(data), out_dir=str(sh), image_root=str(img), process=0, processes=2,
                      progress=False) == full
    assert _samples(sh) == got

    # another run's directory is refused
    from mm.config import ConfigError

    with pytest.raises(ConfigError, match="holds the output of another run .*max_new_tokens: 8 there, 4 now"):
        runner.run("pope", model, str(data), out_dir=str(sh), image_root=str(img), max_new_tokens=4, progress=False)


@pytest.mark.heavy
def test_grounding_runs_on_the_g_branch(setup, tmp_path):
    from mm.eval import refcoco, runner

    model, _, img = setup
    data = tmp_path / "refcoco_val.jsonl"
    data.write_text("".join(json.dumps({"image": f"im{k}.png", "sent": "the dog", "bbox": [1, 2, 10, 12], "id": k})
                            + "\n" for k in (1, 3)))
    s = runner.run("refcoco", model, str(data), out_dir=str(tmp_path / "out"), image_root=str(img), max_new_tokens=6,
                   progress=False)
    assert s["workflow"] == "g"
    got = _samples(tmp_path / "out")
    assert [r["prediction"] for r in got] == _direct(model, refcoco.read(str(data)), img, "g", 6)
    assert s["metrics"]["acc@0.5"] == np.mean([refcoco.hit(r["prediction"], r["box"], *r["image_size"])[0]
                                               for r in got])


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="bogus", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "launch.eval", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_input_exits_2(tmp_path):
    r = _cli("run", "pope", "--model", str(tmp_path / "nosuch"), "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert (r.returncode, r.stderr) == (2, f"mm-eval: error: --model {tmp_path / 'nosuch'}: no such file or "
                                           "directory\n")
    r = _cli("run", "nosuch", "--model", "x", "--data", "y", "--out", "z")
    assert r.returncode == 2 and "invalid choice: 'nosuch'" in r.stderr
    r = _cli("compare", "--base", str(tmp_path), "--model", str(tmp_path), "--tasks", "x", "--out", "o",
             "--vlm-tasks", "pope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("mm-eval: error: ")
