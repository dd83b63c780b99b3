"""The 8B presets are the release recipe (DESIGN.md sections 2-3; issue 12 point 2).

For every preset and stage, the config loads the way `mm-train --config=configs/<family>.py:STAGE,PRESET` loads
it, validates once the five paths a user gives are set (and not before), and its abstract model (`jax.eval_shape`
inside `mm.train.models.build`: nothing is allocated) has mm-sizes' parameter counts and the counts worked out by
hand below, with the CLIP ViT-L/14-336 tower in the tree and frozen, the stage's trainable set, learning rate,
batch size, schedule and template.
"""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from launch import sizes
from mm.config import ConfigError, load_config_file
from mm.train import schema as tcfg
from mm.train import models
from mm.train import optimizer
from mm.train import param_groups as pg
from mm.train.grain_source import data_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# ---- reference counts, by hand from the published shapes (independent of mm)
D, FFN, VOCAB, KV = 4096, 14336, 128256, 8 * 128  # Llama-3-8B (DESIGN.md section 2)
LAYER = 2 * D * D + 2 * D * KV + 3 * D * FFN + 2 * D  # q, o; k, v; gate, up, down; two RMSNorm scales
LLM = 2 * VOCAB * D + D + 32 * LAYER  # embedding, lm_head, final norm, 32 layers
PROJECTOR = 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu 1024 -> 4096 -> 4096, with biases


def branch(n_layers):  # projector, MM-EL, MM-LH, new norm, insertion layers
    return PROJECTOR + 2 * VOCAB * D + D + n_layers * LAYER


IAA14_BRANCH = 4_125_224_960  # issue 12: trainable parameters of one IAA-14 branch on Llama-3-8B
W, PATCH, POSITIONS = 1024, 14, (336 // 14) ** 2 + 1  # CLIP ViT-L/14-336: 576 patches + CLS
VIT_LAYER = 4 * (W * W + W) + (W * 4096 + 4096 + 4096 * W + W) + 2 * 2 * W  # q k v out; fc1 fc2; two LayerNorms
# patch conv (no bias), class embedding, position embeddings, pre-LN, 24 layers, post-LN
CLIP_L_336 = 3 * PATCH * PATCH * W + W + POSITIONS * W + 2 * W + 24 * VIT_LAYER + 2 * W

USER_KEYS = {"init.llm_checkpoint": "/ckpt/llama3-8b", "init.vision_checkpoint": "/ckpt/clip-vit-large-patch14-336",
             "data.path": "/data/rows.json", "data.image_root": "/data/images", "data.tokenizer": "/ckpt/llama3-8b"}

STAGE1 = dict(lr=1e-3, batch_size=256, template="plain")  # DESIGN.md: stage 1 lr 1e-3, batch 256, plain
LATER = dict(lr=2e-5, batch_size=128, template="chat")  # later stages lr 2e-5, batch 128, chat template
# (family, stage) -> recipe, the top-level subtrees that train (all of them), the IAA branches in the model
RECIPES = {
    ("iaa", "stage1"): (STAGE1, ("mm/projector",), ("mm",)),
    ("iaa", "stage2"): (LATER, ("mm",), ("mm",)),
    ("iaa", "instruct"): (LATER, ("mm",), ("mm",)),
    ("iaa", "grounding"): (LATER, ("g",), ("mm", "g")),
    ("llava", "stage1"): (STAGE1, ("projector",), ()),
    ("llava", "stage2"): (LATER, ("projector", "llm"), ()),
    ("llava", "stage2_frozen"): (LATER, ("projector",), ()),
}
PRESETS = {"iaa14_llama3_8b": ("iaa", 14), "iaa8_llama3_8b": ("iaa", 8), "llama3_8b": ("llava", 0)}
CASES = [(p, s) for p, (fam, _) in PRESETS.items() for f, s in RECIPES if f == fam]


def _load(family, stage, preset=None):
    return load_config_file(f"{CONFIGS / family}.py:{stage}" + (f",{preset}" if preset else ""))


_BUILT = {}


@functools.lru_cache(maxsize=None)
def _sizes(model, stage):
    """mm-sizes' rows for Llama-3-8B with the CLIP ViT-L/14-336 tower."""
    return tuple(sizes.count(model, "llama3-8b", "clip-l-336", stage=stage))


def _abstract(cfg):
    """'/'-joined path -> ShapeDtypeStruct of the model the config trains (built once per model section)."""
    key = tcfg.to_json(cfg.model) + cfg.data.kind
    if key not in _BUILT:
        m = models.build(cfg)
        _BUILT[key] = (pg.flatten(nn.unbox(m.abstract)), m)
    return _BUILT[key]


def test_reference_counts_are_designs_figures():
    assert abs(LAYER / 218.1e6 - 1) < 5e-4  # DESIGN.md: one decoder layer 218.1M
    assert branch(14) == IAA14_BRANCH and abs(branch(8) / 2.82e9 - 1) < 2e-3  # IAA-8 ~2.82B
    assert CLIP_L_336 == 303_507_456  # = transformers CLIPVisionModel(CLIPVisionConfig(ViT-L/14-336)) on meta


@pytest.mark.parametrize("preset,stage", CASES)
def test_preset_stage_is_the_release_recipe(preset, stage):
    family, n_insert = PRESETS[preset]
    recipe, trains, branches = RECIPES[family, stage]
    c = _load(family, stage, preset)

    # only the user's five paths are missing: the run refuses to start without data, validates with them set
    with pytest.raises(ConfigError, match="data.path"):
        tcfg.validate(c, n_devices=64)
    for k, v in USER_KEYS.items():
        section, key = k.split(".")
        c[section][key] = v
    tcfg.validate(c, n_devices=64, pending_paths=set(USER_KEYS.values()))

    # optimisation and template of the stage
    assert (c.optim.lr, c.train.batch_size, c.data.template) == (recipe["lr"], recipe["batch_size"],
                                                                 recipe["template"])
    lr = optimizer.schedule(c)
    steps, warm = int(c.train.steps), round(0.03 * int(c.train.steps))  # warmup 3% + cosine (to 0)
    assert float(lr(warm)) == pytest.approx(recipe["lr"], rel=1e-6) and float(lr(steps)) == pytest.approx(0, abs=1e-12)
    assert float(lr(warm + (steps - warm) // 2)) == pytest.approx(recipe["lr"] / 2, rel=2e-3)
    assert float(lr(warm // 2)) == pytest.approx(recipe["lr"] * (warm // 2) / warm, rel=1e-5)

    # the tower: CLIP ViT-L/14-336 run in the step on pixels padded to a square, 576 features an image
    assert c.data.kind == "llava_json" and tcfg.has_tower(c)
    vc = tcfg.vision_config_from(c)
    assert (vc.model_type, vc.hidden_size, vc.intermediate_size, vc.num_layers, vc.num_heads, vc.image_size,
            vc.patch_size, vc.hidden_act, vc.layer_norm_eps) == ("clip_vision_model", 1024, 4096, 24, 16, 336, 14,
                                                                 "quick_gelu", 1e-5)
    assert c.model.vision_select_layer == -2 and c.model.projector == "mlp2x_gelu"
    dc = data_config(c, seed=0, local_rows=1)
    assert (dc.tiling, dc.tile, dc.tokens_per_tile) == ("square", 336, 576)
    assert dc.max_tiles_per_row == c.train.seq_len // 576  # every tile slot of a row can be filled

    # parameter counts of the abstract model: by hand, and as mm-sizes reports them
    flat, _ = _abstract(c)
    tops = {}
    for p, v in flat.items():
        tops[p.split("/")[0]] = tops.get(p.split("/")[0], 0) + v.size
    if family == "iaa":
        assert tuple(c.model.iaa_branches) == branches
        assert tops == {"base": LLM, "vision": CLIP_L_336, **{b: branch(n_insert) for b in branches}}
        if n_insert == 14:
            assert tops["mm"] == IAA14_BRANCH
        rows = _sizes(f"iaa{n_insert}", 2)
        projectors = [f"{b}/projector" for b in branches]
    else:
        assert tops == {"llm": LLM, "projector": PROJECTOR, "vision": CLIP_L_336}
        rows = _sizes("llava", 1 if stage == "stage1" else 2)
        projectors = ["projector"]
    for proj in projectors:
        assert {p: flat[p].shape for p in flat if p.startswith(proj + "/")} == {
            f"{proj}/linear_0/kernel": (1024, 4096), f"{proj}/linear_0/bias": (4096,),
            f"{proj}/linear_1/kernel": (4096, 4096), f"{proj}/linear_1/bias": (4096,)}
    sizes_total, sizes_train = sum(n for _, n, _ in rows), sum(n for _, n, t in rows if t)
    extra = branch(n_insert) if "g" in branches else 0  # mm-sizes counts the mm branch only
    assert sum(tops.values()) == sizes_total + extra

    # param groups cover every parameter; the tower is frozen; exactly the stage's subtrees train
    assignment = pg.assign(list(flat), c.param_groups)
    trainable = set(assignment.trainable_paths)
    assert trainable == {p for p in flat if p.startswith(tuple(t + "/" for t in trains))}
    assert {p for p in flat if p.startswith("vision/")} and not {p for p in trainable if p.startswith("vision/")}
    n_train = sum(flat[p].size for p in trainable)
    if family == "iaa" and stage == "stage1":
        assert n_train == PROJECTOR == dict((m, n) for m, n, _ in rows)["mm/projector"]
    elif stage in ("stage1", "stage2_frozen"):
        assert n_train == PROJECTOR == sum(n for m, n, _ in _sizes("llava", 1) if m.startswith("projector/"))
    elif family == "iaa":
        assert n_train == branch(n_insert) == sizes_train
    else:
        assert n_train == LLM + PROJECTOR == sizes_train


@pytest.mark.parametrize("preset", ["iaa14_llama3_8b", "llama3_8b"])
def test_tower_gives_576_features_of_width_1024_an_image(preset):
    family = PRESETS[preset][0]
    c = _load(family, "stage2", preset)
    flat, m = _abstract(c)
    params = nn.unbox(m.abstract)
    pixels = jax.ShapeDtypeStruct((2, 1, 3, 336, 336), jnp.float32)  # [rows, tiles, C, H, W] from the pipeline
    assert jax.eval_shape(m.pixel_features, params, pixels).shape == (2, 576, 1024)


@pytest.mark.parametrize("family,stage", list(RECIPES))
def test_tiny_preset_every_stage(family, stage):
    recipe, trains, branches = RECIPES[family, stage]
    c = _load(family, stage)
    tcfg.validate(c, n_devices=8)
    assert c.data.kind == "synthetic_mm" and not tcfg.has_tower(c)
    assert (c.optim.lr, c.data.template) == (recipe["lr"], recipe["template"])
    flat, _ = _abstract(c)
    trainable = set(pg.assign(list(flat), c.param_groups).trainable_paths)
    assert trainable == {p for p in flat if p.startswith(tuple(t + "/" for t in trains))}
    if family == "iaa":
        assert tuple(c.model.iaa_branches) == branches


def test_unknown_stage_names_the_stages():
    with pytest.raises(ValueError, match="stage1, stage2, instruct, grounding"):
        _load("iaa", "stage3")
    with pytest.raises(ValueError, match="stage1, stage2, stage2_frozen"):
        _load("llava", "grounding")


def test_position_lists_are_designs():
    from mm.models import iaa

    assert iaa.IAA_14 == (0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31)  # DESIGN.md section 2
    assert iaa.IAA_8 == (0, 1, 10, 11, 20, 21, 30, 31)  # DESIGN.md's suggested default
    assert tuple(_load("iaa", "stage1", "iaa14_llama3_8b").model.iaa_positions) == iaa.IAA_14
    assert tuple(_load("iaa", "stage1", "iaa8_llama3_8b").model.iaa_positions) == iaa.IAA_8
