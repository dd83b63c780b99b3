"""POINTS (DESIGN.md section 4): `configs/points.py:STAGE[,PRESET]`, the ViTs inside the step on CATTY tiles.

The model is the `vlm` kind with pixel shuffle (each 336 tile's 24x24 patches -> 144 positions of 4C) and, from
`pretrain` on, the OCR ViT beside the general one (`model.ocr_tower`), both merged after the one projector as
w * general + (1 - w) * ocr, w = `model.ocr_weight` (0.5). Stages, each from the previous stage's workdir:
- `ocr_vit`: the LLaVA architecture with one ViT (from CLIP ViT-L/14-336, `init.vision_checkpoint`) trained at
  2e-4 and the MLP at 2e-5; LLM frozen. Its ViT becomes the OCR ViT.
- `pretrain` (`--config.init.checkpoint=<ocr_vit workdir>`): the general ViT (from the same CLIP, inherited from
  ocr_vit's `init.vision_checkpoint`) with only its last 3 layers below the feature layer trained at 2e-4; the
  OCR ViT is ocr_vit's ViT (`init.checkpoint_renames`: its `vision` -> `ocr_vision`), frozen; MLP at 2e-5
  (continued from ocr_vit); LLM frozen.
- `instruct` (`--config.init.checkpoint=<pretrain workdir>`): both ViTs frozen; MLP + LLM at 2e-5. The OCR ViT
  comes from ocr_vit through pretrain (`mm.train.initial_params`: each param from the latest stage that trained
  it).
All stages: warmup 3% then cosine to 0; lrs per parameter group are multipliers of `optim.lr`.
Presets: `tiny` (default; tiny shapes, synthetic data with one 28x28 tile a row) and `points_yi9b` (Yi-1.5-9B-Chat
as a Llama, two CLIP ViT-L/14-336, CATTY tiles; `mm/train/presets.py`). A release run sets
`init.llm_checkpoint`, `init.vision_checkpoint` (ocr_vit), `data.path`, `data.image_root`, `data.tokenizer`; an
already-trained OCR ViT in HF format can replace ocr_vit with `init.ocr_vision_checkpoint`.

Choices where DESIGN.md is silent, recorded here:
- "the last 3 layers" are the last 3 that reach the features: features come from the penultimate layer, so the
  last layer (and `post_layernorm`) never gets a gradient; likewise ocr_vit trains the ViT below its feature
  layer and leaves the unused last layer frozen, so trainable counts say what actually changes.
- ocr_vit already pixel-shuffles (the single-ViT POINTS model), so its projector (4C -> D) carries on in pretrain.
- `plain` template (captions / OCR text) for ocr_vit and pretrain, `chat` for instruct; batch 64 rows of 4096
  tokens. Set `train.steps` for your data (the default is a placeholder).
"""

from mm.train import presets

STAGES = ("ocr_vit", "pretrain", "instruct")
LAST_K = 3  # general-ViT layers pretrain trains
VIT_LR, MLP_LR, INSTRUCT_LR = 2e-4, 2e-5, 2e-5


def vit_layers(c, first: int = 0) -> str:
    """Regex alternation of the ViT layers from `first` up to (not including) the feature layer's output."""
    feature_layer = int(c.model.vision.num_layers) + int(c.model.vision_select_layer) + 1
    return "|".join(str(i) for i in range(max(first, 0), feature_layer)), feature_layer


def get_config(arg: str = "ocr_vit"):
    c, stage, big = presets.stage_start("vlm", arg)
    c.name = c.name.replace("vlm_", "points_", 1)
    c.model.pixel_shuffle = True
    c.data.tiling = "catty"  # the Grain pipeline's tiles; an exported model's handle tiles the same way
    c.optim.update(dict(warmup_frac=0.03, min_lr_ratio=0.0))
    if big:
        c.data.update(dict(max_tiles=8, template="chat" if stage == "instruct" else "plain"))
        c.train.update(dict(batch_size=64, steps=1000))
    else:  # a 4x4 patch grid, so the shuffle has 2x2 neighbourhoods: 4 positions a tile
        c.model.vision.update(dict(hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4, image_size=28,
                                   patch_size=7))
        c.train.seq_len = 32
    if stage == "ocr_vit":
        below, _ = vit_layers(c)
        c.param_groups = [(f"vision/(embeddings|pre_layrnorm|encoder/layers_({below}))/.*", 1.0),
                          ("projector/.*", MLP_LR / VIT_LR), ("(vision|llm)/.*", "frozen")]
        c.optim.lr = VIT_LR
    elif stage == "pretrain":
        c.model.ocr_tower = True
        c.init.checkpoint_renames = [["vision", "ocr_vision"]]
        _, feature_layer = vit_layers(c)
        last, _ = vit_layers(c, feature_layer - LAST_K)
        c.param_groups = [(f"vision/encoder/layers_({last})/.*", 1.0), ("projector/.*", MLP_LR / VIT_LR),
                          ("(vision|ocr_vision|llm)/.*", "frozen")]
        c.optim.lr = VIT_LR
    elif stage == "instruct":
        c.model.ocr_tower = True
        c.param_groups = [("(projector|llm)/.*", 1.0), ("(vision|ocr_vision)/.*", "frozen")]
        c.optim.lr = INSTRUCT_LR
    else:
        raise ValueError(f"configs/points.py: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return c
