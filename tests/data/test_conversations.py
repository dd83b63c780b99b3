"""Exact label masks and image positions from per-turn spans, for several chat templates and `plain`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mm import tiny
from mm.data.conversations import ConversationEncoder, normalise_turns, truncate
from mm.data.pipeline import DataConfig, ExampleMaker
from mm.data.skips import SampleSkip
from mm.data.tiling import catty_plan
from tests.helpers.tokenizer import make_tokenizer

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<s>system\\nYou are a helpful assistant.</s>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
MARKS_LAST_TURN = (  # renders the last turn differently: not renderable turn by turn
    "{% for m in messages %}{% if loop.last %}{{ '<s>last ' + m['content'] + '</s>' }}"
    "{% else %}{{ '<s>' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
)

CONV = [
    {"from": "human", "value": "<image>\nwhat is in the image?"},
    {"from": "gpt", "value": "a dog playing"},
    {"from": "human", "value": "and the cat?"},
    {"from": "gpt", "value": "on a red mat"},
]


def expected(tok, pieces):
    """pieces: (text, supervised) or ('IMG', n) -> ids, supervised, image mask, each piece tokenised alone."""
    ids, sup, img = [], [], []
    for a, b in pieces:
        if a == "IMG":
            ids += [-1] * b
            sup += [False] * b
            img += [True] * b
            continue
        t = tok(a, add_special_tokens=False)["input_ids"]
        ids += t
        sup += [b] * len(t)
        img += [False] * len(t)
    return np.array(ids), np.array(sup), np.array(img)


def check(enc, exp, image_id):
    ids, sup, img = exp
    ids = np.where(img, image_id, ids)
    np.testing.assert_array_equal(enc.ids, ids)
    np.testing.assert_array_equal(enc.supervised, sup)
    np.testing.assert_array_equal(enc.image_mask, img)


def test_helper_template_multi_turn_exact_mask():
    tok = make_tokenizer()
    enc = ConversationEncoder(tok)
    e = enc.encode(normalise_turns(CONV, "r"), [5], "r")
    check(e, expected(tok, [("<s>user\n", False), ("IMG", 5), ("\nwhat is in the image?</s>\n", False),
                            ("<s>assistant\n", False), ("a dog playing</s>", True), ("\n", False),
                            ("<s>user\nand the cat?</s>\n", False), ("<s>assistant\n", False),
                            ("on a red mat</s>", True), ("\n", False)]), enc.image_token_id)
    assert enc.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert tok.decode(e.ids[e.supervised]) == tok.decode(tok("a dog playing</s>on a red mat</s>",
                                                              add_special_tokens=False)["input_ids"])
    assert e.image_starts == [int(np.flatnonzero(e.image_mask)[0])] and e.image_tokens == [5]


def test_llama3_template_exact_mask():
    tok = tiny.train_tokenizer(384)
    img_id = tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    enc = ConversationEncoder(tok, image_token_id=img_id)
    e = enc.encode(normalise_turns(CONV, "r"), [3], "r")
    H = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    check(e, expected(tok, [("<|begin_of_text|>" + H("user"), False), ("IMG", 3),
                            ("\nwhat is in the image?<|eot_id|>", False), (H("assistant"), False),
                            ("a dog playing<|eot_id|>", True), (H("user") + "and the cat?<|eot_id|>", False),
                            (H("assistant"), False), ("on a red mat<|eot_id|>", True)]), img_id)
    # the end-of-turn token is supervised, the header is not
    assert e.supervised[e.ids == tok.convert_tokens_to_ids("<|eot_id|>")].tolist() == [False, True, False, True]


def test_chatml_default_system_prompt_and_system_turn():
    tok = make_tokenizer()
    tok.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    enc = ConversationEncoder(tok)
    e = enc.encode(normalise_turns(CONV[:2], "r"), [2], "r")
    check(e, expected(tok, [("<s>system\nYou are a helpful assistant.</s>\n<s>user\n", False), ("IMG", 2),
                            ("\nwhat is in the image?</s>\n", False), ("<s>assistant\n", False),
                            ("a dog playing</s>", True), ("\n", False)]), enc.image_token_id)
    conv = [{"from": "system", "value": "be brief"}] + CONV[:2]
    e2 = enc.encode(normalise_turns(conv, "r"), [2], "r")
    check(e2, expected(tok, [("<s>system\nbe brief</s>\n", False), ("<s>user\n", False), ("IMG", 2),
                             ("\nwhat is in the image?</s>\n", False), ("<s>assistant\n", False),
                             ("a dog playing</s>", True), ("\n", False)]), enc.image_token_id)


def test_plain_template():
    tok = make_tokenizer()
    enc = ConversationEncoder(tok, "plain")
    e = enc.encode(normalise_turns(CONV[:2], "r"), [4], "r")
    check(e, expected(tok, [("<s>", False), ("IMG", 4), ("a dog playing", True), ("</s>", True)]), enc.image_token_id)


def test_template_not_renderable_turn_by_turn_is_skipped():
    tok = make_tokenizer()
    tok.chat_template = MARKS_LAST_TURN
    with pytest.raises(SampleSkip) as e:
        ConversationEncoder(tok).encode(normalise_turns(CONV, "row7"), [1], "row7")
    assert e.value.reason == "template_not_prefix" and e.value.row_id == "row7"


def test_placeholders_multiple_images_and_prepend():
    tok = make_tokenizer()
    enc = ConversationEncoder(tok)
    conv = [{"from": "human", "value": "<image> and <image> differ how?"}, {"from": "gpt", "value": "colour"}]
    e = enc.encode(normalise_turns(conv, "r"), [2, 3], "r")
    assert e.image_mask.sum() == 5 and e.image_tokens == [2, 3]
    assert e.image_starts[1] > e.image_starts[0] + 2
    # no placeholder: prepended to the first user turn, as LLaVA does
    e = enc.encode(normalise_turns([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}], "r"), [3], "r")
    check(e, expected(tok, [("<s>user\n", False), ("IMG", 3), ("\nhi</s>\n", False), ("<s>assistant\n", False),
                            ("a</s>", True), ("\n", False)]), enc.image_token_id)
    with pytest.raises(SampleSkip, match="image_count_mismatch"):
        enc.encode(normalise_turns(conv, "r"), [2], "r")
    with pytest.raises(SampleSkip, match="image_count_mismatch"):
        enc.encode(normalise_turns(conv, "r"), [], "r")


@pytest.mark.parametrize("conv,reason", [
    ([{"from": "human", "value": "hi"}], "no_assistant_turn"),
    ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "unknown_role"),
    ([{"from": "human"}], "bad_row"),
    ([], "bad_row"),
])
def test_turn_errors(conv, reason):
    with pytest.raises(SampleSkip) as e:
        normalise_turns(conv, "r1")
    assert e.value.reason == reason


def test_truncation_never_cuts_an_image_span():
    tok = make_tokenizer()
    enc = ConversationEncoder(tok)
    conv = [{"from": "human", "value": "<image><image> what?"}, {"from": "gpt", "value": "a dog"}]
    e = enc.encode(normalise_turns(conv, "r"), [4, 4], "r")
    s0, s1 = e.image_starts
    for cut in range(1, len(e) + 2):
        t = truncate(e, cut)
        assert len(t) <= cut
        # every kept image keeps its whole span; no partial span survives
        assert t.image_mask.sum() == sum(t.image_tokens)
        for s, c in zip(t.image_starts, t.image_tokens):
            assert t.image_mask[s:s + c].all() and len(t) >= s + c
        if s1 < cut < s1 + 4:
            assert len(t) == s1 and t.image_tokens == [4]
        if s0 < cut < s0 + 4:
            assert len(t) == s0 and t.image_tokens == []


@pytest.mark.parametrize("size", [(1920, 1080), (800, 600), (1000, 1000), (3000, 300), (300, 1000)])
def test_placeholder_count_follows_catty_grid(size, tmp_path):
    w, h = size
    Image.new("RGB", (w, h), (10, 200, 30)).save(tmp_path / "a.png")
    cfg = DataConfig(max_len=4096, tile=336, tokens_per_tile=7, max_tiles_per_row=9)
    ex = ExampleMaker(cfg, make_tokenizer(), str(tmp_path))({"id": "x", "image": "a.png", "conversations": CONV[:2]})
    plan = catty_plan(w, h, 336, 8, True)
    assert ex["pixels"].shape == (plan.num_images, 3, 336, 336)
    assert int(ex["image_mask"].sum()) == plan.num_images * 7
    if size == (1920, 1080):  # DESIGN.md worked example: grid 4x2 plus thumbnail
        assert plan.grid == (4, 2) and plan.num_images == 9


def test_template_that_raises_is_a_skip_not_a_crash():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    conv = [{"from": "system", "value": "x"}] + CONV[:2]
    with pytest.raises(SampleSkip) as e:
        ConversationEncoder(tok).encode(normalise_turns(conv, "r3"), [1], "r3")
    assert e.value.reason == "template_error" and "no system role" in e.value.message
