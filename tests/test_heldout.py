"""`mm.heldout`: the built-in soup scorers. Exact match prompts every answer turn exactly as the tokenizer's own
chat template renders the conversation so far (`apply_chat_template(..., add_generation_prompt=True)`, the
reference) and counts the reproduced answers; the loss scorer is minus `mm.ppl`'s mean NLL (itself checked
against transformers); test splits are refused; `mm-soup --score` runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mm import heldout
from mm.config import ConfigError

pytestmark = pytest.mark.heavy  # its own CI step (.ci/run), not the README test command

MAX_NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.helpers.vlm_dirs import tiny_iaa_vlm_with_tokenizer

    d = tmp_path_factory.mktemp("heldout")
    path = tiny_iaa_vlm_with_tokenizer(d / "model")
    (d / "img").mkdir()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 3)).astype(np.uint8)).save(d / "img" / "a.png")
    return path, d


def _reference_answer(h, messages, workflow, pixels=None):
    """The model's greedy answer to the prompt the tokenizer's chat template renders (the independent prompt)."""
    tok = h.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    img_id = tok.convert_tokens_to_ids("<image>")
    ids = [h.image_token if t == img_id else t for t in ids]
    stops = sorted({int(tok.eos_token_id)} | set(h.config.lm.llm.eos_token_id))
    kw = {} if pixels is None else {"pixel_values": [pixels]}
    out = h.generate([ids], workflow=workflow, max_new_tokens=MAX_NEW, stop_tokens=stops, **kw)[0].tolist()
    out = out[:next((k for k, t in enumerate(out) if t in stops), len(out))]
    return tok.decode(out, skip_special_tokens=True).strip()


def test_exact_match_prompts_like_the_chat_template_and_counts_reproduced_answers(model, tmp_path):
    import mm
    from mm.data.pipeline import DataConfig, ImageTiler
    from mm.data import images as img_lib

    path, d = model
    h = mm.from_pretrained(path)
    q1, q2, q3 = "the cat sat", "on the mat", "a red dog"
    a1 = _reference_answer(h, [{"role": "user", "content": q1}], "text")
    hist = [{"role": "user", "content": q2}, {"role": "assistant", "content": "first answer"}]
    a3 = _reference_answer(h, hist + [{"role": "user", "content": q3}], "text")
    assert a1 and a3, (a1, a3)  # a random model of this scale answers something
    rows = [
        {"id": "right", "conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": a1.upper() + "."}]},
        {"id": "wrong", "conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": "zz " + a1}]},
        {"id": "two_turns", "conversations": [{"from": "human", "value": q2}, {"from": "gpt", "value": "first answer"},
                                              {"from": "human", "value": q3}, {"from": "gpt", "value": a3}]},
        {"id": "no_answer", "conversations": [{"from": "human", "value": q1}]},
    ]
    split = tmp_path / "val.json"
    split.write_text(json.dumps(rows))
    em = heldout.ExactMatch(split, workflow="text", max_new_tokens=MAX_NEW)
    score = em(str(path))
    # right (case and full stop normalised away) and the second turn of two_turns are reproduced; wrong and
    # two_turns' first turn ("first answer") are not; no_answer is skipped and counted
    assert em.last["correct"] == [True, False, False, True], (em.last, a1, a3)
    assert em.last["skips"] == {"no_assistant_turn": 1}
    assert score == pytest.approx(np.mean(em.last["correct"]))

    # an image row on the mm workflow: the placeholder opens the first user turn, the tile is LLaVA's square
    tiler = ImageTiler(DataConfig(tiling="square", tile=h.config.vision.image_size))
    px = tiler(img_lib.load_image(str(d / "img" / "a.png")))[0]
    a_img = _reference_answer(h, [{"role": "user", "content": "<image>\n" + q1}], "mm", px)
    img_split = tmp_path / "val_images.json"
    img_split.write_text(json.dumps([{"id": "img", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": a_img}]}]))
    em = heldout.ExactMatch(img_split, image_root=str(d / "img"), max_new_tokens=MAX_NEW)
    assert em(str(path)) == 1.0, (em.last, a_img)


def test_test_splits_are_refused(tmp_path):
    for name in ("test.json", "shapes_test.jsonl", "test/val.json"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("[]")
        with pytest.raises(ConfigError, match="test split"):
            heldout.check_split(p)
    ok = tmp_path / "latest" / "val.json"  # "latest" is not "test"
    ok.parent.mkdir()
    ok.write_text("[]")
    assert heldout.check_split(ok) == ok
    with pytest.raises(ConfigError, match="no such file"):
        heldout.check_split(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="--score 'bleu'"):
        heldout.make_scorer("bleu", ok)


def test_loss_scorer_is_minus_the_mean_nll_and_drives_mm_soup(model, tmp_path):
    from launch.soup import main
    from mm import ppl

    path, d = model
    rows = [{"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nthe cat"}, {"from": "gpt", "value": "sat on the mat " * (i + 1)}]}
        for i in range(3)]
    split = tmp_path / "val.json"
    split.write_text(json.dumps(rows))
    root = str(d / "img")
    score = heldout.make_scorer("loss", split, image_root=root)
    want = -ppl.heldout_loss(path, split, image_root=root, batch_size=16)
    assert score(str(path)) == pytest.approx(want, rel=1e-6) and want < 0
    out = tmp_path / "soup"
    assert main(["greedy", str(path), str(path), "--dst", str(out), "--score", "loss", "--split", str(split),
                 "--image-root", root, "--accept", "ge"]) == 0
    report = json.loads((out / "soup_report.json").read_text())
    assert [x["score"] for x in report["ingredients"]] == pytest.approx([want, want], rel=1e-6)
    assert main(["greedy", str(path), str(path), "--dst", str(tmp_path / "o2"), "--score", "loss",
                 "--accept", "ge"]) == 2  # --score needs --split
