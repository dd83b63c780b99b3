"""`mm.bpo` / `mm-bpo negatives`: the noise schedule against DESIGN.md's literals, the pair rules, and a run on a
tiny IAA model: pairs in the preference format with provenance, counts that add up, the injection rewrite on
the IAA text workflow (the frozen base), an interrupted run that resumes to the uninterrupted output, the
pairs feeding `data.kind=preference` examples, and two processes (jax.distributed) writing one process's pairs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest
from PIL import Image

from mm import bpo
from mm.config import ConfigError

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command
REPO = Path(__file__).resolve().parents[1]


def test_schedule_matches_the_design_literals():
    a = bpo.alphas_bar()
    assert a.shape == (1000,)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert 1 - a[0] == pytest.approx(sig(-6) * (5e-3 - 1e-5) + 1e-5, rel=1e-12)  # beta_0 by hand
    assert math.sqrt(a[900]) == pytest.approx(0.365, abs=5e-4)  # DESIGN.md: t = 900 -> sqrt(abar) = 0.365
    x = np.full((3, 64, 64), 2.0, np.float32)
    y = bpo.weaken(x, 900, seed=1)
    assert np.array_equal(y, bpo.weaken(x, 900, seed=1)) and not np.array_equal(y, bpo.weaken(x, 900, seed=2))
    noise = (y - math.sqrt(a[900]) * x) / math.sqrt(1 - a[900])
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ConfigError, match="--t 1000"):
        bpo.weaken(x, 1000, 0)


def test_pair_rules():
    assert bpo.verdict("a red circle", "a blue circle") is None
    assert bpo.verdict("a red circle", "A red circle.") == "negative_equals_answer"
    assert bpo.verdict("a red circle", "  ") == "empty_negative"
    assert bpo.verdict("word " * 351, "other") == "over_max_words"
    assert bpo.verdict("short", "word " * 350) is None and bpo.verdict("short", "word " * 351) == "over_max_words"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.helpers.vlm_dirs import tiny_iaa_vlm_with_tokenizer

    d = tmp_path_factory.mktemp("bpo")
    model = tiny_iaa_vlm_with_tokenizer(d / "model")  # the rewrite prompt has commas: not the placeholder
    (d / "img").mkdir()
    rs = np.random.RandomState(0)
    for k in range(3):
        Image.fromarray(rs.randint(0, 256, (28 + 6 * k, 30, 3)).astype(np.uint8)).save(d / "img" / f"{k}.png")
    rows = [{"id": f"r{i}", "image": f"{i % 3}.png", "conversations": [
        {"from": "human", "value": "<image>\nthe cat sat"}, {"from": "gpt", "value": "a dog on the mat"},
        *([{"from": "human", "value": "and then"}, {"from": "gpt", "value": "the cat ran"}] if i % 2 else [])]}
        for i in range(5)]
    rows.append({"id": "missing", "image": "nope.png", "conversations": rows[0]["conversations"]})
    data = d / "rows.json"
    data.write_text(json.dumps(rows))
    return model, data, d / "img"


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_negatives_end_to_end_resume_and_preference_examples(setup, tmp_path, monkeypatch):
    from mm.api import VLMHandle

    model, data, root = setup
    kw = dict(image_root=str(root), max_new_tokens=6, batch_size=4, chunk_rows=2, log=lambda _: None)
    workflows = []
    real = VLMHandle.generate

    def spy(self, ids, **k):
        workflows.append((k.get("workflow"), "pixel_values" in k))
        return real(self, ids, **k)

    monkeypatch.setattr(VLMHandle, "generate", spy)
    s = bpo.negatives(model, data, out=tmp_path / "full.jsonl", **kw)
    monkeypatch.setattr(VLMHandle, "generate", real)
    assert set(workflows) == {("mm", True), ("text", False)}  # weakened images on mm; the rewrite on the base
    pairs = _read(tmp_path / "full.jsonl")
    turns = 5 + 2  # rows 1 and 3 have two answer turns
    assert s["complete"] and s["skipped"] == {"missing_image": 1}
    assert s["kept"] + sum(s["dropped"].values()) == 2 * turns and s["kept"] == len(pairs) > 0
    for p in pairs:
        assert p["chosen"] in ("a dog on the mat", "the cat ran") and p["rejected"] != p["chosen"]
        assert p["conversations"][0]["value"].startswith("<image>\n") and p["conversations"][-1]["from"] == "human"
        assert p["bpo"]["method"] in ("noise", "inject") and p["id"].startswith(p["bpo"]["source_id"] + ":")
        if p["bpo"]["method"] == "noise":
            assert p["bpo"]["t"] == 900
        if p["bpo"]["turn"] == 1:  # the second question's prompt holds the first turn and its reference answer
            assert [t["value"] for t in p["conversations"][1:]] == ["a dog on the mat", "and then"]
    summary = json.loads((tmp_path / "full.jsonl.parts" / "summary.json").read_text())
    assert summary["kept"] == len(pairs)

    # interrupted after one chunk, then resumed: the uninterrupted output, no row written twice
    part = bpo.negatives(model, data, out=tmp_path / "resumed.jsonl", stop_after_chunks=1, **kw)
    assert not part["complete"] and not (tmp_path / "resumed.jsonl").exists()
    bpo.negatives(model, data, out=tmp_path / "resumed.jsonl", **kw)
    assert _read(tmp_path / "resumed.jsonl") == pairs
    with pytest.raises(ConfigError, match="another run .*t: 900 there, 500 now"):
        bpo.negatives(model, data, out=tmp_path / "resumed.jsonl", **dict(kw, t=500))

    # the pairs are what data.kind=preference reads: chosen / rejected examples share the prompt and image
    from transformers import AutoTokenizer

    from mm.data.pipeline import DataConfig, ExampleMaker

    maker = ExampleMaker(DataConfig(kind="preference", tiling="square", tile=28, tokens_per_tile=4),
                         AutoTokenizer.from_pretrained(str(model)), str(root))
    ex = maker(pairs[0])
    assert "pair" in ex, ex
    c, r = ex["pair"]
    n = min(len(c["ids"]), len(r["ids"]))
    first = int(np.flatnonzero(c["supervised"])[0])
    assert np.array_equal(c["ids"][:first], r["ids"][:first]) and first < n


def test_cli_errors_exit_2(setup, tmp_path, capsys):
    from launch.bpo import main

    model, data, root = setup
    base = ["negatives", "--model", str(model), "--image-root", str(root), "--out", str(tmp_path / "o.jsonl")]
    assert main(base + ["--data", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(base + ["--data", str(data), "--methods", "noise,blur"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_two_processes_make_the_pairs_of_one(setup, tmp_path):
    """Two CPU processes joined by jax.distributed (gloo) run `mm-bpo negatives` through the CLI: process p's
    chunks hold exactly rows p::2, both log progress with an ETA, and the merged pairs and summary equal one
    process's. One row a chunk (`--chunk-rows 1`) keeps the chunk layout - and so every sampling seed and
    every generation batch - the same for any process count; with more rows a chunk, a chunk is a block of
    a process's own rows p::P, so its seed (its first row's index) and batch make-up change with P and so do
    the sampled negatives (the module promises equal output across restarts, not across process counts)."""
    model, data, root = setup
    n_rows = len(json.loads(data.read_text()))
    one = bpo.negatives(model, data, image_root=str(root), out=tmp_path / "one.jsonl", max_new_tokens=4,
                        batch_size=4, chunk_rows=1, log=lambda _: None)
    out = tmp_path / "two.jsonl"
    port = portpicker.pick_unused_port()
    args = ["negatives", "--model", str(model), "--data", str(data), "--image-root", str(root), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "4", "--chunk-rows", "1", "--coordinator",
            f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "launch.bpo", *args, "--process-id", str(i)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (stdout, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"mm-bpo p{i}/2: {len(range(i, n_rows, 2))}/{len(range(i, n_rows, 2))} rows" in stdout, stdout
        assert "ETA" in stdout, stdout
    parts = out.with_name(out.name + ".parts")
    for i in range(2):
        files = sorted(parts.glob(f"pairs-p{i}-*.jsonl"))
        assert [f.name for f in files] == [f"pairs-p{i}-{c:05d}.jsonl" for c in range(len(range(i, n_rows, 2)))]
        rows = [sorted({r["index"] for r in _read(f)}) for f in files]
        assert rows == [[j] for j in range(i, n_rows, 2)], rows  # chunk c of process i: its c-th row of i::2
    assert _read(out) == _read(tmp_path / "one.jsonl") and len(_read(out)) == one["kept"] > 0
    assert json.loads((parts / "summary.json").read_text()) == json.loads(
        (tmp_path / "one.jsonl.parts" / "summary.json").read_text())
