"""mm-ppl: perplexity scoring (parity with transformers' Llava, packing invariance, skips, resume, several
processes) and filtering (lowest fraction / max PPL, original order and format, histogram), and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

from mm import ppl
from tests.helpers.hf_llava import IMG_ID, hf_llava, hf_pixels, write_images
from tests.helpers.tokenizer import _CORPUS, make_tokenizer

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command

WORDS = sorted(set(" ".join(_CORPUS).split()))
REPO = Path(__file__).resolve().parents[1]


def _text(rs, n):
    return " ".join(rs.choice(WORDS, n))


def _rows(names, n, seed=0, answer_words=(4, 30)):
    """n rows: images cycling through `names` (every 5th row has two), varied answer lengths, a second turn
    on some rows."""
    rs = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        imgs = [names[i % len(names)]] + ([names[(i + 1) % len(names)]] if i % 5 == 4 else [])
        conv = [{"from": "human", "value": "<image>" * len(imgs) + "\n" + _text(rs, 3)},
                {"from": "gpt", "value": _text(rs, rs.randint(*answer_words))}]
        if i % 3 == 1:
            conv += [{"from": "human", "value": _text(rs, 2)}, {"from": "gpt", "value": _text(rs, 5)}]
        rows.append({"id": f"r{i}", "image": imgs if len(imgs) > 1 else imgs[0], "conversations": conv})
    return rows


@pytest.fixture(scope="module")
def iaa(tmp_path_factory):
    """A tiny IAA VLM dir with a tokenizer beside it, an image root and 24 rows."""
    from tests.helpers.vlm_dirs import tiny_iaa_vlm

    d = tmp_path_factory.mktemp("ppl_iaa")
    model, _, _ = tiny_iaa_vlm(d / "model", scale=3.0)
    make_tokenizer(64).save_pretrained(str(model))
    (d / "img").mkdir()
    names = write_images(d / "img", [(28, 28), (40, 28), (28, 50), (60, 60)])
    data = d / "rows.json"
    data.write_text(json.dumps(_rows(names, 24)))
    return model, data, d / "img"


# --------------------------------------------------------------------------------------- parity vs HF
def test_scores_match_transformers_llava(tmp_path):
    """mm's packed scores of an HF Llava converted to an mm dir == the mean NLL transformers gives the same
    supervised tokens (float32), row by row."""
    import torch

    from launch.convert import main as mm_convert
    from mm.data.images import ProcessorConfig
    from mm.data.pipeline import DataConfig, ExampleMaker

    hf = hf_llava()
    hf.save_pretrained(str(tmp_path / "hf"))
    assert mm_convert(["hf-to-mm", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "mm"), "--no-progress"]) == 0
    tok = make_tokenizer()
    tok.save_pretrained(str(tmp_path / "mm"))
    (tmp_path / "img").mkdir()
    names = write_images(tmp_path / "img", [(28, 28), (40, 28), (28, 50), (33, 61)])
    rows = _rows(names, 6, seed=1, answer_words=(20, 40))
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))

    res = ppl.score(tmp_path / "mm", data, image_root=str(tmp_path / "img"), batch_size=2, max_len=512,
                    progress=False)
    assert res.complete and len(res.rows) == 6 and not res.skipped
    assert res.tokens >= 256

    # the reference: token ids and supervised positions as the pipeline makes them (images expanded to 4
    # positions of <image> each), pixels from transformers' processor, transformers' forward in float32
    maker = ExampleMaker(DataConfig(max_len=512, tiling="square", tile=28, tokens_per_tile=4), tok,
                         str(tmp_path / "img"), processor=ProcessorConfig.clip(28))
    errs = []
    for r, got in zip(rows, res.rows):
        ex = maker(r)
        imgs = r["image"] if isinstance(r["image"], list) else [r["image"]]
        assert (ex["ids"][ex["image_mask"]] == IMG_ID).all() and ex["image_mask"].sum() == 4 * len(imgs)
        assert (ex["ids"][~ex["image_mask"]] != IMG_ID).all()
        pix = torch.cat([hf_pixels(tmp_path / "img" / n) for n in imgs])
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(ex["ids"][None], dtype=torch.long), pixel_values=pix).logits[0]
        target = torch.tensor(ex["ids"][1:], dtype=torch.long)
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), target, reduction="none").numpy()
        sup = ex["supervised"][1:]
        want = float(nll[sup].mean())
        assert got["id"] == r["id"] and got["n_tokens"] == int(sup.sum())
        errs.append(abs(got["nll_sum"] / got["n_tokens"] - want))
        assert math.isclose(got["ppl"], math.exp(want), rel_tol=1e-3)
    print(f"max |mean NLL mm - transformers| = {max(errs):.2e} over {res.tokens} tokens")
    assert max(errs) <= 1e-4, errs


# --------------------------------------------------------------------------------------- IAA, packing, skips
def test_iaa_scores_are_finite_and_packing_does_not_change_them(iaa):
    model, data, root = iaa
    packed = ppl.score(model, data, image_root=str(root), batch_size=3, max_len=256, progress=False)
    single = ppl.score(model, data, image_root=str(root), batch_size=1, max_len=256, pack=False, progress=False)
    assert packed.complete and len(packed.rows) == 24 and not packed.skipped
    assert [r["index"] for r in packed.rows] == list(range(24))
    for a, b in zip(packed.rows, single.rows):
        assert a["id"] == b["id"] and a["n_tokens"] == b["n_tokens"] > 0
        assert math.isfinite(a["ppl"]) and a["ppl"] > 1.0
        assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-4 * max(1.0, abs(b["nll_sum"])), (a, b)
    assert len({round(r["ppl"], 6) for r in packed.rows}) > 20  # rows really differ
    # heldout_loss is the token-weighted mean NLL of the same scores
    assert abs(ppl.heldout_loss(model, data, image_root=str(root), max_len=256) - packed.mean_nll) < 1e-6


def test_bad_rows_are_skipped_by_reason_and_counted(iaa, tmp_path):
    model, data, root = iaa
    rows = json.loads(data.read_text())[:4]
    rows.append({"id": "gone", "image": "nope.png", "conversations": rows[0]["conversations"]})
    rows.append({"id": "mute", "image": rows[0]["image"], "conversations": [rows[0]["conversations"][0]]})
    long_prompt = {"from": "human", "value": "<image>\n" + " ".join(WORDS * 8)}  # past max_len: truncation
    rows.append({"id": "long", "image": rows[0]["image"],  # leaves no supervised token
                 "conversations": [long_prompt, rows[0]["conversations"][1]]})
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"id": "broken", "image": "broken.png", "conversations": rows[0]["conversations"]})
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(rows))
    res = ppl.score(model, f, image_root=str(root), batch_size=2, max_len=256, out_dir=str(tmp_path / "out"),
                    progress=False)
    assert res.complete and [r["id"] for r in res.rows] == ["r0", "r1", "r2", "r3"]
    got = {s["id"]: s["skip"] for s in res.skipped}
    assert got == {"gone": "missing_image", "mute": "no_assistant_turn", "long": "no_supervised_tokens",
                   "broken": "corrupt_image"}, got
    assert res.skips["missing_image"] == 1 and sum(res.skips.values()) == 4
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skips"] == res.skips and summary["scored"] == 4
    merged = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [m["id"] for m in merged] == ["r0", "r1", "r2", "r3"]  # skipped rows are not scores
    assert all(m["ppl"] > 0 and math.isfinite(m["ppl"]) for m in merged)


def test_interrupted_run_resumes_without_rescoring(iaa, tmp_path, capsys):
    model, data, root = iaa
    kw = dict(image_root=str(root), batch_size=3, max_len=256, chunk_rows=5)
    full = ppl.score(model, data, **kw, progress=False)
    out = tmp_path / "out"
    part = ppl.score(model, data, **kw, out_dir=str(out), stop_after_chunks=1, progress=False)
    assert not part.complete and 5 <= len(part.rows) < 24 and not (out / "scores.jsonl").exists()
    first = sorted(os.listdir(out))
    assert first == ["meta.json", "scores-p0-00000.jsonl"], first
    done = len(part.rows)
    res = ppl.score(model, data, **kw, out_dir=str(out))
    assert f"{done} already scored" in capsys.readouterr().out
    assert res.complete and len(res.rows) == 24
    merged = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [m["index"] for m in merged] == list(range(24))  # once each, in row order
    recs = [json.loads(x) for f in sorted(out.glob("scores-p0-*.jsonl")) for x in f.read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == list(range(24))  # no row written twice
    lines = (out / "scores-p0-00000.jsonl").read_text().splitlines()
    first_chunk = {json.loads(x)["index"]: json.loads(x) for x in lines}
    assert all(first_chunk[i] == part.rows[k] for k, i in enumerate(sorted(first_chunk)))  # kept, not rescored
    for a, b in zip(full.rows, merged):
        assert a["index"] == b["index"] and abs(a["nll_sum"] - b["nll_sum"]) <= 1e-5 * max(1, abs(a["nll_sum"]))
    # another model / data into the same dir is refused
    from mm.config import ConfigError

    with pytest.raises(ConfigError, match="another run"):
        ppl.score(model, data, **{**kw, "max_len": 128}, out_dir=str(out), progress=False)


# --------------------------------------------------------------------------------------- filtering
def _scores_for(rows, ppls):
    return [{"index": i, "id": r["id"], "nll_sum": math.log(p) * 10, "n_tokens": 10, "ppl": p}
            for i, (r, p) in enumerate(zip(rows, ppls)) if p is not None]


def test_filter_keeps_the_lowest_fraction_in_original_order(tmp_path):
    rows = [{"id": f"x{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": "é"}], "extra": i}
            for i in range(9)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows, indent=2))
    ppls = [5.0, 1.0, 3.0, 3.0, None, 9.0, 2.0, 3.0, 7.0]  # row 4 was skipped; three rows tie at 3.0
    rep = ppl.filter_rows(data, _scores_for(rows, ppls), keep=0.5, out=tmp_path / "kept.json")
    kept = json.loads((tmp_path / "kept.json").read_text())
    # 8 scored -> 4 kept: 1.0 (row 1), 2.0 (row 6), then the 3.0 ties by index: rows 2 and 3 (not 7)
    assert kept == [rows[1], rows[2], rows[3], rows[6]]
    assert rep["kept"] == 4 and rep["dropped"] == 4 and rep["unscored"] == 1 and rep["threshold"] == 3.0
    assert Path(rep["histogram"]).stat().st_size > 1000 and Path(rep["histogram"]).read_bytes()[:4] == b"\x89PNG"
    rep = ppl.filter_rows(data, _scores_for(rows, ppls), max_ppl=3.0, out=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == [rows[i] for i in (1, 2, 3, 6, 7)]
    assert rep["kept"] == 5 and rep["threshold"] == 3.0
    # JSONL in, the same lines out; scores read from a file
    jl = tmp_path / "rows.jsonl"
    lines = [json.dumps(r, separators=(",", ":")) for r in rows]
    jl.write_text("\n".join(lines) + "\n")
    sf = tmp_path / "scores.jsonl"
    sf.write_text("".join(json.dumps(s) + "\n" for s in _scores_for(rows, ppls)))
    ppl.filter_rows(jl, sf, keep=0.25, out=tmp_path / "k.jsonl")
    assert (tmp_path / "k.jsonl").read_text() == lines[1] + "\n" + lines[6] + "\n"
    from mm.config import ConfigError

    wrong = _scores_for(rows, ppls)
    wrong[0]["id"] = "other"
    with pytest.raises(ConfigError, match="id 'other'"):
        ppl.filter_rows(data, wrong, keep=0.5, out=tmp_path / "w.json")


def test_score_then_filter_end_to_end(iaa, tmp_path, monkeypatch):
    model, data, root = iaa
    monkeypatch.chdir(model.parent)  # a relative model dir loads too
    res = ppl.score(model.name, data, image_root=str(root), out_dir=str(tmp_path / "out"), batch_size=4, max_len=256,
                    progress=False)
    rep = ppl.filter_rows(data, tmp_path / "out", keep=0.25, out=tmp_path / "kept.json")
    kept = json.loads((tmp_path / "kept.json").read_text())
    best = sorted(res.rows, key=lambda r: (r["ppl"], r["index"]))[:6]
    assert [k["id"] for k in kept] == [r["id"] for r in sorted(best, key=lambda r: r["index"])]
    assert rep["kept"] == 6 and rep["threshold"] == best[-1]["ppl"]


# --------------------------------------------------------------------------------------- CLI, processes
def _cli(*args, env=None, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch.ppl", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_bad_input_exits_2_naming_the_file(tmp_path, iaa):
    from launch.ppl import main

    model, data, root = iaa
    missing = tmp_path / "nothere.json"
    p = _cli("score", "--model", str(model), "--data", str(missing), "--out", str(tmp_path / "o"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and str(missing) in p.stderr and "--data" in p.stderr
    assert main(["filter", "--data", str(data), "--scores", str(tmp_path / "none.jsonl"), "--keep", "0.2",
                 "--out", str(tmp_path / "k.json")]) == 2
    assert main(["filter", "--data", str(data), "--scores", str(data), "--keep", "1.5",
                 "--out", str(tmp_path / "k.json")]) == 2
    assert main(["score", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")]) == 2


def test_two_processes_score_like_one(iaa, tmp_path):
    """Two CPU processes joined by jax.distributed (gloo) each score rows p::2 through the CLI; the merged
    scores equal one process's, and `filter` runs on them."""
    model, data, root = iaa
    one = ppl.score(model, data, image_root=str(root), batch_size=3, max_len=256, progress=False)
    port = portpicker.pick_unused_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ["score", "--model", str(model), "--data", str(data), "--image-root", str(root), "--out",
            str(tmp_path / "out"), "--batch-size", "3", "--max-len", "256", "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2"]
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    procs = [subprocess.Popen([sys.executable, "-m", "launch.ppl", *args, "--process-id", str(i)], cwd=REPO,
                              env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "samples/s" in outs[0][0] and "ETA" in outs[1][0]
    files = sorted(f.name for f in (tmp_path / "out").glob("scores-p*.jsonl"))
    assert files == ["scores-p0-00000.jsonl", "scores-p1-00000.jsonl"], files
    p1 = [json.loads(x)["index"] for x in (tmp_path / "out" / "scores-p1-00000.jsonl").read_text().splitlines()]
    assert p1 == list(range(1, 24, 2))
    merged = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [m["index"] for m in merged] == list(range(24))
    err = max(abs(a["nll_sum"] / a["n_tokens"] - b["nll_sum"] / b["n_tokens"]) for a, b in zip(one.rows, merged))
    assert err <= 1e-5, err
    p = _cli("filter", "--data", str(data), "--scores", str(tmp_path / "out" / "scores.jsonl"), "--keep", "0.5",
             "--out", str(tmp_path / "kept.json"))
    assert p.returncode == 0, p.stderr
    assert len(json.loads((tmp_path / "kept.json").read_text())) == 12


def test_array_record_input_and_a_local_device_mesh_score_the_same(iaa, tmp_path):
    """Rows packed to ArrayRecord (`mm-data pack`) score as the JSON rows do; a data-parallel mesh over 4 local
    devices gives the scores of the default single device."""
    import jax

    from mm.data.pack import pack_llava

    model, data, root = iaa
    rows = json.loads(data.read_text())[:8]
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    pack_llava(str(f), str(root), str(tmp_path / "shards"), num_shards=1)
    assert jax.local_device_count() >= 4
    assert dict(ppl.load_vlm(model, None, 4).runtime.mesh.shape)["data"] == 4
    base = ppl.score(model, f, image_root=str(root), batch_size=4, max_len=256, progress=False)
    ar = ppl.score(model, tmp_path / "shards", batch_size=4, max_len=256, progress=False)
    dp = ppl.score(model, f, image_root=str(root), batch_size=4, max_len=256, local_devices=4, progress=False)
    assert [r["id"] for r in ar.rows] == [r["id"] for r in dp.rows] == [r["id"] for r in base.rows] == \
        [r["id"] for r in rows]
    for a, b, c in zip(base.rows, ar.rows, dp.rows):
        assert a["n_tokens"] == b["n_tokens"] == c["n_tokens"]
        assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-5 * abs(a["nll_sum"])
        assert abs(a["nll_sum"] - c["nll_sum"]) <= 1e-5 * abs(a["nll_sum"])
