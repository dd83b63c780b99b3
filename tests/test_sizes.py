"""mm-sizes: counts from shapes only match DESIGN.md's figures for Llama-3-8B."""

from launch import sizes

POINTS_CONFIG = "configs/points.py"  # what `mm-sizes --model points` reads (named here: a Bazel data dependency)


def _totals(rows):
    return sum(n for _, n, t in rows if t), sum(n for _, n, _ in rows)


def test_iaa_branch_sizes_on_llama3_8b():
    train14, total14 = _totals(sizes.count("iaa14", "llama3-8b"))
    train8, _ = _totals(sizes.count("iaa8", "llama3-8b"))
    assert abs(train14 / 4.13e9 - 1) < 0.005 and abs(train8 / 2.82e9 - 1) < 0.005
    layer = 218.1e6  # one Llama-3-8B decoder layer (DESIGN.md)
    assert abs((train14 - train8) / 6 / layer - 1) < 0.001  # IAA-14 has 6 more insertion layers
    rows = dict((m, (n, t)) for m, n, t in sizes.count("iaa14", "llama3-8b"))
    assert not rows["base/layers_*"][1] and not rows["vision/encoder"][1] and rows["mm/projector"][1]
    assert rows["mm/projector"][0] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096


def test_llava_stages_and_render():
    s1, total = _totals(sizes.count("llava", "llama3-8b", stage=1))
    s2, _ = _totals(sizes.count("llava", "llama3-8b", stage=2))
    assert s1 == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert abs(s2 - s1 - 8.03e9) / 8.03e9 < 0.01
    text = sizes.render(sizes.count("llava", "llama3-8b", vision_spec=None, stage=1))
    assert "trainable" in text and "(0.02B)" in text


def test_points_release_stage_counts_by_hand():
    """configs/points.py at release shapes: CLIP ViT-L/14-336 towers, Yi-1.5-9B-Chat; trainable by each stage's
    parameter groups (mm-sizes --model points --stage S)."""
    vit_layer = 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024) + 4 * 1024
    vit_below = 3 * 14 * 14 * 1024 + 1024 + 577 * 1024 + 2 * 1024  # patch conv, class, positions, pre-layernorm
    mlp = (4 * 1024 * 4096 + 4096) + (4096 * 4096 + 4096)  # pixel-shuffled 4C -> D -> D
    yi = 2 * 64000 * 4096 + 48 * (2 * 4096 * 4096 + 2 * 4096 * 512 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    want = {"ocr_vit": vit_below + 23 * vit_layer + mlp, "pretrain": 3 * vit_layer + mlp, "instruct": mlp + yi}
    vit = vit_below + 24 * vit_layer + 2 * 1024  # + the unused last layer and post-layernorm
    for stage, n in want.items():
        trainable, total = _totals(sizes.points_count(stage))
        assert trainable == n, (stage, trainable, n)
        assert total == yi + mlp + vit * (1 if stage == "ocr_vit" else 2)
    assert want == {"ocr_vit": 324_471_808, "pretrain": 71_351_296, "instruct": 8_862_969_856}
