"""mm.preference_eval: the held-out preference metrics of a converted transformers Llava against another one,
checked against transformers' own forward in float32 (the summed log-probs of the final answer alone) and the
metrics computed by hand from those sums; a model against itself has zero rewards; skipped pairs are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.hf_llava import hf_llava, hf_pixels, write_images
from tests.helpers.tokenizer import make_tokenizer

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command

BETA = 0.1


def _pairs(names):
    rs = np.random.RandomState(3)
    words = "the a cat dog red blue on under big small mat box two three".split()
    say = lambda n: " ".join(rs.choice(words, n))  # noqa: E731
    rows = []
    for i in range(6):
        conv = [{"from": "human", "value": "<image>\n" + say(3)}]
        if i % 2:  # an earlier turn, with its answer, is prompt: not scored
            conv += [{"from": "gpt", "value": say(6)}, {"from": "human", "value": say(2)}]
        rows.append({"id": f"p{i}", "image": names[i % len(names)], "conversations": conv,
                     "chosen": say(4 + i), "rejected": say(9 - i)})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from launch.convert import main as mm_convert

    d = tmp_path_factory.mktemp("pref_eval")
    tok = make_tokenizer()
    hf = {}
    for name, seed in (("a", 0), ("b", 1)):
        hf[name] = hf_llava(seed)
        hf[name].save_pretrained(str(d / f"hf_{name}"))
        assert mm_convert(["hf-to-mm", "--src", str(d / f"hf_{name}"), "--dst", str(d / name), "--no-progress"]) == 0
        tok.save_pretrained(str(d / name))
    (d / "img").mkdir()
    names = write_images(d / "img", [(28, 28), (40, 28), (28, 50)])
    rows = _pairs(names)
    (d / "pairs.json").write_text(json.dumps(rows))
    return d, hf, tok, rows


def _hf_final_answer_logps(model, tok, root, row, answer):
    """Summed log-prob of the final answer (and its end-of-turn token) by transformers: the log-prob of the
    whole conversation's supervised tokens minus that of the prompt's own (earlier answers): a causal model
    scores the shared prefix the same either way."""
    import torch

    from mm.data.pipeline import DataConfig, ExampleMaker
    from mm.data.images import ProcessorConfig

    maker = ExampleMaker(DataConfig(max_len=512, tiling="square", tile=28, tokens_per_tile=4), tok, str(root),
                         processor=ProcessorConfig.clip(28))
    pix = hf_pixels(root / row["image"])

    def summed(conv):
        ex = maker({"id": row["id"], "image": row["image"], "conversations": conv})
        if "skip" in ex:  # the prompt alone has no answer turn
            return 0.0
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ex["ids"][None], dtype=torch.long), pixel_values=pix).logits[0]
        lp = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ex["ids"][1:])[:, None])[:, 0].numpy()
        return float(lp[ex["supervised"][1:]].sum())

    return summed(row["conversations"] + [{"from": "gpt", "value": answer}]) - summed(row["conversations"])


def test_metrics_match_transformers_and_a_hand_computation(setup):
    from mm import preference_eval as pe
    from mm.heldout import Loader

    d, hf, tok, rows = setup
    load = Loader()
    got = {n: pe.pair_logps(load(d / n), d / "pairs.json", image_root=str(d / "img"), batch_size=4) for n in "ab"}
    want = {n: {half: np.array([_hf_final_answer_logps(hf[n], tok, d / "img", r, r[half]) for r in rows])
                for half in ("chosen", "rejected")} for n in "ab"}
    err = max(float(np.max(np.abs(got[n][h] - want[n][h]))) for n in "ab" for h in ("chosen", "rejected"))
    print(f"max |summed log-prob mm - transformers| = {err:.2e}")
    assert err <= 1e-4, err
    assert got["a"]["ids"] == [r["id"] for r in rows] and not got["a"]["skipped"]

    m = pe.metrics(got["a"], got["b"], BETA)
    w = want["a"]
    rc, rr = BETA * (w["chosen"] - want["b"]["chosen"]), BETA * (w["rejected"] - want["b"]["rejected"])
    hand = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
            "rewards/accuracies": (rc > rr).mean(), "logps/chosen": w["chosen"].mean(),
            "logps/rejected": w["rejected"].mean(), "preference/accuracy": (w["chosen"] > w["rejected"]).mean(),
            "preference/margin": (w["chosen"] - w["rejected"]).mean()}
    for k, v in hand.items():
        assert abs(m[k] - v) <= 1e-4 * max(1.0, abs(v)), (k, m[k], v)
    assert m["pairs"] == len(rows)

    same = pe.evaluate(d / "a", d / "a", d / "pairs.json", image_root=str(d / "img"), loader=load)
    assert same["rewards/margins"] == 0.0 and same["rewards/accuracies"] == 0.0
    assert same["preference/accuracy"] == m["preference/accuracy"]


def test_unusable_pairs_are_skipped_and_counted(setup, tmp_path):
    from mm import preference_eval as pe
    from mm.heldout import Loader

    d, _, _, rows = setup
    bad = rows[:2] + [{**rows[2], "image": "missing.png"}, {**rows[3], "rejected": None}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    got = pe.pair_logps(Loader()(d / "a"), tmp_path / "bad.json", image_root=str(d / "img"))
    assert got["ids"] == ["p0", "p1"] and got["skipped"] == {"missing_image": 1, "bad_row": 1}, got


def test_cli_prints_and_writes_the_metrics_and_bad_input_exits_2(setup, tmp_path, capsys):
    from launch.bpo import main

    d, _, _, _ = setup
    args = ["evaluate", "--model", str(d / "a"), "--reference", str(d / "b"), "--pairs", str(d / "pairs.json"),
            "--image-root", str(d / "img"), "--out", str(tmp_path / "m.json")]
    assert main(args) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert json.loads(capsys.readouterr().out) == m and m["pairs"] == 6 and m["rewards/margins"] != 0.0
    assert main([*args[:-4], "--image-root", str(tmp_path / "nope")]) == 2
    assert "--image-root" in capsys.readouterr().err
