"""`mm.soup` / `mm-soup`: selection against literal transcriptions of the greedy-soup algorithm (model-soups paper,
strict `>`; POINTS, `>=`) and of the maximum / average soups on tables of synthetic models with a known score;
float32 accumulation (a bf16 soup of N models is the float64 mean rounded once to bf16, bit for bit) on mm and
HF checkpoints; IAA soups copy the shared frozen base; errors name the tensor and both files; nothing partial."""

from __future__ import annotations

import json
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mm import soup as soup_lib
from mm.config import ConfigError
from flax.traverse_util import flatten_dict as flatten

from mm.checkpoints.mm_dir import load_param_paths, params_metadata, read_mm_manifest
from mm.convert.registry import hf_to_mm
from mm.checkpoints.errors import ConversionError
from tests.helpers.hf_models import make_llama


# ----------------------------------------------------------------- literal transcriptions (the references)
def paper_greedy(models, score, accept):
    """Greedy soup as the papers state it: sort by held-out score, descending; the best is the first ingredient;
    each next model is added if score(avg(ingredients + [m])) >= (POINTS) / > (model-soups) score(avg(ingredients))."""
    ranked = sorted(range(len(models)), key=lambda i: score(models[i]), reverse=True)  # stable: ties keep order
    ingredients = [ranked[0]]
    decisions = []
    for m in ranked[1:]:
        with_m = score(np.mean([models[i] for i in ingredients + [m]], axis=0))
        without = score(np.mean([models[i] for i in ingredients], axis=0))
        add = with_m >= without if accept == "ge" else with_m > without
        decisions.append((m, add))
        if add:
            ingredients = ingredients + [m]
    return ranked, ingredients, decisions, np.mean([models[i] for i in ingredients], axis=0)


def paper_maximum(models, score, p):
    ranked = sorted(range(len(models)), key=lambda i: score(models[i]), reverse=True)
    return sorted(ranked[:p]), np.mean([models[i] for i in ranked[:p]], axis=0)


def _table(seed, n=7, dim=5):
    """Synthetic "models" (weight vectors) and a known score: negative distance to a target, rounded to 2
    decimals so that equal scores (where >= and > part ways) occur; one model duplicates another, so adding it
    to a soup of that one leaves the score exactly equal."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=dim)
    models = [target + rng.normal(scale=s, size=dim) for s in rng.uniform(0.2, 2.0, size=n)]
    models.append(models[int(rng.integers(n))].copy())

    def score(w):
        return round(-float(np.linalg.norm(np.asarray(w) - target)), 2)

    return models, score


def _select(models, score, method, **kw):
    return soup_lib.select(method, len(models), lambda i: score(models[i]),
                           lambda members: score(np.mean([models[i] for i in members], axis=0)), **kw)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("accept", ["ge", "gt"])
def test_greedy_matches_the_literal_algorithm(seed, accept):
    models, score = _table(seed)
    ranked, ingredients, decisions, result = paper_greedy(models, score, accept)
    sel = _select(models, score, "greedy", accept=accept)
    assert sel.order == ranked
    assert sel.members == ingredients
    assert [(s["members"][-1], s["accepted"]) for s in sel.soups] == decisions
    np.testing.assert_array_equal(np.mean([models[i] for i in sel.members], axis=0), result)
    assert sel.score == score(result)


def test_ge_and_gt_part_ways_on_an_equal_score():
    """The best model and its exact copy: the soup of both scores the same as the best alone."""
    models = [np.array([1.0, 0.0]), np.array([3.0, 1.0]), np.array([1.0, 0.0])]
    score = lambda w: -abs(float(w[0]) - 1.0)  # noqa: E731
    ge, gt = _select(models, score, "greedy", accept="ge"), _select(models, score, "greedy", accept="gt")
    assert paper_greedy(models, score, "ge")[1] == ge.members == [0, 2]
    assert paper_greedy(models, score, "gt")[1] == gt.members == [0]
    assert [s["accepted"] for s in ge.soups] == [True, False]
    assert [s["accepted"] for s in gt.soups] == [False, False]


@pytest.mark.parametrize("seed", range(6))
def test_maximum_and_average_match_the_literal_definitions(seed):
    models, score = _table(seed)
    for p in range(1, len(models) + 1):
        members, result = paper_maximum(models, score, p)
        sel = _select(models, score, "maximum", top_p=p)
        assert sel.members == members
        np.testing.assert_allclose(np.mean([models[i] for i in sel.members], axis=0), result, rtol=1e-12)
        assert sel.score == score(np.mean([models[i] for i in members], axis=0))
    sel = _select(models, score, "average")
    assert sel.members == list(range(len(models)))
    assert sel.score == score(np.mean(models, axis=0))


@pytest.mark.parametrize("kw, needle", [
    (dict(method="greedy"), "--accept"), (dict(method="maximum"), "--top-p"),
    (dict(method="maximum", top_p=9), "--top-p"), (dict(method="average", accept="ge"), "greedy soups only"),
    (dict(method="median"), "method"),
])
def test_options_are_explicit(kw, needle):
    method = kw.pop("method")
    with pytest.raises(ConfigError, match=needle):
        soup_lib.select(method, 3, lambda i: 0.0, lambda m: 0.0, **kw)


# ------------------------------------------------------------------------------ checkpoints: fixtures
@pytest.fixture(scope="module")
def bf16_llamas(tmp_path_factory):
    """Three tiny random bf16 Llama HF dirs (same architecture, different weights) and their mm conversions."""
    root = tmp_path_factory.mktemp("soup")
    hf = [make_llama(root / f"hf{i}", dtype=torch.bfloat16, seed=i) for i in range(3)]
    mm = [hf_to_mm(h, root / f"mm{i}", progress=False) for i, h in enumerate(hf)]
    return hf, mm


def _mm_tensors(mm_dir):
    meta = params_metadata(mm_dir)
    tree = load_param_paths(mm_dir, list(meta), {p: m[1] for p, m in meta.items()}, {p: m[0] for p, m in meta.items()})
    return {p: np.asarray(a) for p, a in flatten(tree).items()}


def _hf_tensors(hf_dir):
    """Read with safetensors' torch backend (independent of mm's reader)."""
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _f64_mean_to_bf16(arrays):
    return np.mean([np.asarray(a, np.float64) for a in arrays], axis=0).astype(ml_dtypes.bfloat16)


def test_bf16_mm_soup_is_the_float64_mean_rounded_once(bf16_llamas, tmp_path):
    _, mm = bf16_llamas
    sel = soup_lib.soup(mm, tmp_path / "soup", method="average")
    assert sel.members == [0, 1, 2]
    ins = [_mm_tensors(d) for d in mm]
    out = _mm_tensors(tmp_path / "soup")
    assert sorted(out) == sorted(ins[0])
    n_rounded = 0
    for p, a in out.items():
        assert a.dtype == ml_dtypes.bfloat16, p
        ref = _f64_mean_to_bf16([x[p] for x in ins])
        np.testing.assert_array_equal(a.view(np.uint16), ref.view(np.uint16), err_msg="/".join(p))
        n_rounded += int(np.sum(ref.astype(np.float64) != np.mean([x[p].astype(np.float64) for x in ins], axis=0)))
    assert n_rounded > 1000  # the mean really needed rounding: the equality is a statement about rounding
    m = read_mm_manifest(tmp_path / "soup")
    assert m["llm"] == read_mm_manifest(mm[0])["llm"] and m["source"]["format"] == "mm-soup"
    report = json.loads((tmp_path / "soup" / soup_lib.REPORT_JSON).read_text())
    assert report["method"] == "average" and len(report["final"]["members"]) == 3


def test_bf16_hf_soup_is_the_float64_mean_rounded_once(bf16_llamas, tmp_path):
    hf, _ = bf16_llamas
    soup_lib.soup(hf, tmp_path / "soup", method="average")
    ins = [_hf_tensors(d) for d in hf]
    out = _hf_tensors(tmp_path / "soup")
    assert sorted(out) == sorted(ins[0])
    for k, t in out.items():
        assert t.dtype == torch.bfloat16, k
        ref = torch.stack([x[k].double() for x in ins]).mean(0).to(torch.bfloat16)
        assert torch.equal(t.view(torch.int16), ref.view(torch.int16)), k
    want = json.loads((hf[0] / "config.json").read_text())
    assert json.loads((tmp_path / "soup" / "config.json").read_text()) == want


def test_dtype_option_and_mixed_float_dtypes(bf16_llamas, tmp_path):
    hf, _ = bf16_llamas
    f32 = make_llama(tmp_path / "f32", dtype=torch.float32, seed=5)
    with pytest.raises(ConversionError, match=r"pass --dtype") as e:
        soup_lib.soup([hf[0], f32], tmp_path / "x", method="average")
    assert "model.safetensors" in str(e.value) and not (tmp_path / "x").exists()
    soup_lib.soup([hf[0], f32], tmp_path / "y", method="average", dtype="float32")
    a, b, out = _hf_tensors(hf[0]), _hf_tensors(f32), _hf_tensors(tmp_path / "y")
    for k, t in out.items():
        assert t.dtype == torch.float32
        ref = ((a[k].float() + b[k].float()) / 2)
        assert torch.equal(t, ref), k
    assert json.loads((tmp_path / "y" / "config.json").read_text()).get("dtype", "float32") == "float32"


# ----------------------------------------------------------------------------------------- IAA
@pytest.fixture(scope="module")
def iaa_model():
    """A tiny IAA VLM (tower, base LLM, one `mm` branch): config and params."""
    import jax

    from mm.config import LLMConfig, VisionConfig
    from mm.models import iaa, kinds, llm, vision, vlm
    from mm.config import ProjectorConfig

    vc = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=28, patch_size=14)
    lc = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, eos_token_id=(2,))
    cfg = vlm.VLMConfig(vision=vc, lm=iaa.IAAConfig(llm=lc, branches=(
        iaa.BranchConfig("mm", (0,), ProjectorConfig(in_dim=16, out_dim=32)),)), image_token_id=5)
    params = kinds.of(cfg).init_params(jax.random.PRNGKey(2), llm.init_params(lc, jax.random.PRNGKey(1)),
                                       vision.init_params(vc, jax.random.PRNGKey(0)))
    return cfg, jax.tree.map(np.asarray, params)


def _iaa_dir(iaa_model, path, branch_seed, base_seed=None):
    """The model with its branch (and, given `base_seed`, its base) perturbed: a fine-tuned branch of one base."""
    import jax

    from mm.convert import registry

    cfg, params = iaa_model
    params = dict(params)
    for key, seed in (("mm", branch_seed), ("base", base_seed)):
        if seed is not None:
            rng = np.random.default_rng(seed)
            params[key] = jax.tree.map(lambda x: (x + rng.normal(scale=0.02, size=x.shape)).astype(x.dtype),
                                       params[key])
    return registry.save("vlm", cfg, params, path)


def test_iaa_soup_averages_the_branch_and_copies_the_shared_base(iaa_model, tmp_path):
    dirs = [_iaa_dir(iaa_model, tmp_path / f"iaa{i}", branch_seed=10 + i) for i in range(3)]
    soup_lib.soup(dirs, tmp_path / "soup", method="average")
    ins, out = [_mm_tensors(d) for d in dirs], _mm_tensors(tmp_path / "soup")
    branch = [p for p in out if p[0] == "mm"]
    assert branch and any(p[0] == "base" for p in out)
    n_averaged = 0
    for p, a in out.items():
        if p[0] == "mm" and not all(np.array_equal(ins[0][p], x[p]) for x in ins):
            n_averaged += 1
            ref = (np.sum([x[p].astype(np.float32) for x in ins], axis=0) / np.float32(3)).astype(a.dtype)
            np.testing.assert_array_equal(a, ref, err_msg="/".join(p))
        else:  # base (frozen by construction), the tower: copied from the first ingredient
            assert a.tobytes() == ins[0][p].tobytes(), p
    assert n_averaged == len(branch)
    other_base = _iaa_dir(iaa_model, tmp_path / "other", branch_seed=10, base_seed=7)
    with pytest.raises(ConversionError, match=r"tensor base/\S+ differs between .*iaa0.* and .*other.*frozen base"):
        soup_lib.soup([dirs[0], other_base], tmp_path / "bad", method="average")
    assert not (tmp_path / "bad").exists()


def test_mm_train_workdirs_are_souped_as_their_exports(tmp_path):
    """Two IAA runs of one base (same init seed, different data order) and one of them already exported: the
    soup of the workdirs equals the float32 mean of their separate exports (`export_run`), branch tensor by
    branch tensor; the base is copied; the soup's source and report name the workdirs."""
    import jax

    from mm.data.synthetic import write_llava_dataset
    from mm.tiny import train_tokenizer
    from mm.train.export import export_run
    from mm.train.loop import train
    from tests.train.helpers_train import tiny_iaa_llava

    path, root = write_llava_dataset(str(tmp_path / "data"), 12, seed=3, min_side=16, max_side=40)
    train_tokenizer(240).save_pretrained(str(tmp_path / "tok"))
    runs = []
    for k in range(2):
        c = tiny_iaa_llava(path, root, str(tmp_path / "tok"))
        c.model.llm.vocab_size = 320
        c.train.update(dict(steps=2, batch_size=2, seq_len=64))
        c.optim.grad_accum = 1
        c.data.seed = 10 + k
        c.checkpoint.update(dict(every=0, use_async=False))
        train(c, tmp_path / f"run{k}", devices=jax.devices()[:1])
        runs.append(tmp_path / f"run{k}")
    exports = [export_run(r, tmp_path / f"export{k}") for k, r in enumerate(runs)]
    sel = soup_lib.soup([runs[0], exports[1]], tmp_path / "soup", method="average")
    assert sel.members == [0, 1]
    ins, out = [_mm_tensors(d) for d in exports], _mm_tensors(tmp_path / "soup")
    moved = 0
    for key, a in out.items():
        ref = ins[0][key]
        if key[0] == "mm" and not np.array_equal(ins[0][key], ins[1][key]):
            moved += 1
            ref = ((ins[0][key].astype(np.float32) + ins[1][key].astype(np.float32)) / np.float32(2)).astype(a.dtype)
        np.testing.assert_array_equal(a, ref, err_msg="/".join(key))
    assert moved > 10
    assert not any(k[0] == "base" and not np.array_equal(ins[0][k], ins[1][k]) for k in out)
    src = read_mm_manifest(tmp_path / "soup")["source"]
    assert src["ingredients"] == [str(runs[0].absolute()), str(exports[1].absolute())]
    report = json.loads((tmp_path / "soup" / "soup_report.json").read_text())
    assert report["ingredients"][0]["path"] == str(runs[0].absolute())
    assert not (tmp_path / "soup" / ".soup-work").exists()


# -------------------------------------------------------------------------- scorer, greedy end to end
def _scorer_module(monkeypatch, fn):
    mod = types.ModuleType("soup_test_scorer")
    mod.score = fn
    monkeypatch.setitem(sys.modules, "soup_test_scorer", mod)
    return "soup_test_scorer:score"


def test_greedy_end_to_end_writes_the_chosen_soup_and_the_report(bf16_llamas, tmp_path, monkeypatch):
    """Score = minus the distance of the final norm weight, read from the checkpoint, to the mean of the first
    two ingredients' (a known function of the weights): their soup is accepted, the third is rejected; the
    decisions in the report must follow the rule on the scores the scorer returned for each candidate dir."""
    _, mm = bf16_llamas
    seen = []
    target = np.mean([_mm_tensors(d)[("norm", "scale")].astype(np.float64) for d in mm[:2]], axis=0)

    def score(path):
        seen.append(path)
        return -float(np.linalg.norm(_mm_tensors(path)[("norm", "scale")].astype(np.float64) - target))

    spec = _scorer_module(monkeypatch, score)
    sel = soup_lib.soup(mm, tmp_path / "soup", method="greedy", scorer=spec, accept="ge")
    n_scored = len(seen)
    report = json.loads((tmp_path / "soup" / soup_lib.REPORT_JSON).read_text())
    assert [r["score"] for r in report["ingredients"]] == [score(str(d)) for d in mm]
    ranked = sorted(range(3), key=lambda i: report["ingredients"][i]["score"], reverse=True)
    assert report["order"] == [report["ingredients"][i]["path"] for i in ranked]
    current, best = [report["order"][0]], report["ingredients"][ranked[0]]["score"]
    for s in report["soups"]:
        assert s["members"] == current + [s["members"][-1]]
        assert s["accepted"] == (s["score"] >= best)
        if s["accepted"]:
            current, best = s["members"], s["score"]
    assert report["final"] == {"members": current, "score": best} and len(report["soups"]) == 2
    assert n_scored == 3 + 2  # each ingredient, each candidate soup
    assert [s["accepted"] for s in report["soups"]] == [True, False] and sorted(sel.members) == [0, 1]
    ins, out = [_mm_tensors(d) for d in mm], _mm_tensors(tmp_path / "soup")
    for p, a in out.items():
        want = _f64_mean_to_bf16([ins[i][p] for i in sel.members])
        np.testing.assert_array_equal(a.view(np.uint16), want.view(np.uint16))
    assert score(str(tmp_path / "soup")) == best
    assert (tmp_path / "soup" / soup_lib.REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["soup"]  # no scratch left beside it


# --------------------------------------------------------------------------------- errors, atomicity
def test_mismatched_tensor_is_named_with_both_files(tmp_path):
    a = make_llama(tmp_path / "a", seed=0)
    b = make_llama(tmp_path / "b", seed=1, intermediate_size=48)
    with pytest.raises(ConversionError) as e:
        soup_lib.soup([a, b], tmp_path / "out", method="average")
    msg = str(e.value)
    assert "mlp" in msg and "shape" in msg and str(a) in msg and str(b) in msg, msg
    c = make_llama(tmp_path / "c", seed=1, rope_theta=1234.0)
    with pytest.raises(ConversionError, match=r"config.json .*differ at '(rope_parameters\.)?rope_theta'"):
        soup_lib.soup([a, c], tmp_path / "out", method="average")
    ma, mb = hf_to_mm(a, tmp_path / "ma", progress=False), hf_to_mm(b, tmp_path / "mb", progress=False)
    with pytest.raises(ConversionError, match=r"tensor layers_0/mlp/\S+: shape .*ma/params.*mb/params"):
        soup_lib.soup([ma, mb], tmp_path / "out", method="average")
    with pytest.raises(ConversionError, match="of one kind"):
        soup_lib.soup([ma, a], tmp_path / "out", method="average")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {"kind": "nope"}}')
    with pytest.raises(ConfigError, match=r"run/config.json: no .* section"):
        soup_lib.soup([run, run], tmp_path / "out", method="average")
    assert not (tmp_path / "out").exists()


def test_a_failing_write_or_scorer_leaves_nothing(bf16_llamas, tmp_path, monkeypatch):
    hf, mm = bf16_llamas
    calls = {"n": 0}
    real = soup_lib.mean_tensor

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(soup_lib, "mean_tensor", failing)
    for src, name in ((hf, "hf_out"), (mm, "mm_out")):
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            soup_lib.soup(src, tmp_path / name, method="average")
    monkeypatch.setattr(soup_lib, "mean_tensor", real)

    def bad_score(path):
        if "soup-" in path:
            raise RuntimeError("evaluator crashed")
        return 1.0

    with pytest.raises(RuntimeError, match="evaluator crashed"):
        soup_lib.soup(mm, tmp_path / "greedy_out", method="greedy", scorer=bad_score, accept="gt")
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory, no candidates


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    from launch.soup import main

    a = make_llama(tmp_path / "a", seed=0)
    b = make_llama(tmp_path / "b", seed=1, intermediate_size=48)
    capsys.readouterr()  # transformers' save progress bars
    cases = [([ "average", str(a), str(b), "--dst", str(tmp_path / "o")], "mlp"),
             (["greedy", str(a), str(a), "--dst", str(tmp_path / "o"), "--scorer", "x:y"], "cannot import"),
             (["greedy", str(a), str(a), "--dst", str(tmp_path / "o")], "--accept"),
             (["average", str(a), str(tmp_path / "nope"), "--dst", str(tmp_path / "o")], "nope")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mm-soup: error: ") and needle in err, err
    assert not (tmp_path / "o").exists()
    assert main(["average", str(a), str(a), "--dst", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").exists()

