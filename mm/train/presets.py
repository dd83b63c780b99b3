"""Presets and stage recipes for the stage configs (`configs/iaa.py`, `configs/llava.py`, `configs/points.py`).

`apply(cfg, name)` fills the model, data and mesh sections in place:
- `tiny`: tiny shapes on synthetic features (`data.kind = synthetic_mm`), for tests and smoke runs;
- `llama3_8b` (LLaVA baseline), `iaa14_llama3_8b`, `iaa8_llama3_8b`: the release setup of DESIGN.md sections 2-3.
  Llama-3-8B; the CLIP ViT-L/14-336 tower in `model.vision`, run in the step on pixels (features of the
  penultimate layer, class token dropped: 24 x 24 = 576 positions an image); an `mlp2x_gelu` projector
  1024 -> 4096 -> 4096; LLaVA JSON data (`data.kind = llava_json`) with each image padded to a square of the
  CLIP mean colour (`data.tiling = square`); IAA insertion positions `mm.models.iaa.IAA_14` / `IAA_8`.
  A run sets only `init.llm_checkpoint`, `init.vision_checkpoint`, `data.path`, `data.image_root`, `data.tokenizer`.
- `points_yi9b` (`configs/points.py`): Yi-1.5-9B-Chat (`YI_15_9B`) with the same CLIP ViT-L/14-336 shapes for
  both towers, CATTY tiles (tile 336, up to 8 + thumbnail) in 4096-token rows of at most 18 tiles; the stage
  config turns on the OCR tower and pixel shuffle.

`stage(cfg, big, projector_only=, rows=)` sets a stage's optimisation: the projector-only first stage at lr 1e-3,
batch 256, `plain` template; every later stage at lr 2e-5, batch 128, `chat` template; warmup 3% + cosine to 0
(DESIGN.md: LLaVA-1.5's settings). Choices where DESIGN.md is silent, recorded here:
- batch rows are packed (`data.pack = True`, first-fit into `train.seq_len = 2048`, LLaVA-1.5's
  `model_max_length`): `train.batch_size` counts rows, each holding a few examples, where LLaVA-1.5's counts
  examples. (Unpacked rows, `data.pack = False`, get per-batch bucket lengths, which the micro batches of one
  step, `optim.grad_accum > 1`, and the processes of a multi-host run do not share.) A row holds at most
  2048 // 576 = 3 images (`data.max_tiles_per_row = 3`: no tile slot that can never be filled runs the ViT).
- `train.steps` of the 8B presets: LLaVA-1.5's number of updates, its data size over its batch size
  (`CAPTION_ROWS` for the caption stages, `INSTRUCT_ROWS` for the instruction and grounding stages); packed
  rows make that more than one pass over the same data. Set `train.steps` for other data.
- the ViT computes in bfloat16 with float32 params, like the LLM.
"""

from __future__ import annotations

import math
from typing import Any

from mm.config import IAA_8, IAA_14

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=[128001, 128009], pad_token_id=None, dtype="bfloat16", param_dtype="float32",
                 remat_policy="dots_no_batch")

# openai/clip-vit-large-patch14-336's vision tower (HF CLIPVisionConfig fields under mm.config.VisionConfig names)
CLIP_VIT_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_layers=24,
                      num_heads=16, image_size=336, patch_size=14, num_channels=3, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, use_head=False, dtype="bfloat16", param_dtype="float32")

# 01-ai/Yi-1.5-9B-Chat, POINTS' LLM: a Llama-architecture decoder (DESIGN.md section 4's release; its config.json
# under mm.config.LLMConfig names). eos: <|endoftext|> (2) and the chat turn end <|im_end|> (7).
YI_15_9B = dict(model_type="llama", vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_layers=48,
                num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=5_000_000.0, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 7],
                pad_token_id=0, dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512)

PRESETS = ("tiny", "llama3_8b", "iaa14_llama3_8b", "iaa8_llama3_8b", "points_yi9b")
# the big presets' LLM, data tiling and row length: points_yi9b cuts images into CATTY tiles (up to 8 + thumbnail,
# 144 positions each after pixel shuffle) in 4096-token rows that hold up to 18 tiles (two full images)
_BIG = {"points_yi9b": (YI_15_9B, "catty", 4096, 18)}

PROJECTOR_STAGE = dict(lr=1e-3, batch_size=256, template="plain")  # stage 1: the projector alone
LATER_STAGE = dict(lr=2e-5, batch_size=128, template="chat")  # every stage after it
CAPTION_ROWS = 558_128  # LLaVA-1.5's pre-training captions (LCS-558K)
INSTRUCT_ROWS = 665_298  # LLaVA-1.5's instruction mix (llava_v1_5_mix665k)


def apply(cfg: Any, name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    if name == "tiny":
        cfg.model.llm.update(TINY)
        cfg.model.vision_width = 32
        cfg.model.iaa_positions = (0, 1)
        cfg.train.update(dict(steps=20, batch_size=8, seq_len=32, log_every=1))
        cfg.data.kind = "synthetic_mm"
        cfg.data.num_image_tokens = 4
        cfg.checkpoint.every = 10
        return
    llm_shapes, tiling, seq_len, tiles_per_row = _BIG.get(name, (LLAMA3_8B, "square", 2048, 0))
    cfg.model.llm.update(llm_shapes)
    cfg.model.vision.update(CLIP_VIT_L_336)
    cfg.model.vision_select_layer = -2
    cfg.model.projector = "mlp2x_gelu"
    grid = CLIP_VIT_L_336["image_size"] // CLIP_VIT_L_336["patch_size"]
    cfg.model.vision_width = CLIP_VIT_L_336["hidden_size"]  # used only if data.kind is set to synthetic_mm
    cfg.data.num_image_tokens = grid * grid  # likewise
    cfg.model.iaa_positions = IAA_8 if name.startswith("iaa8") else IAA_14
    cfg.data.update(dict(kind="llava_json", tiling=tiling, pack=True,
                         max_tiles_per_row=tiles_per_row or seq_len // (grid * grid)))
    cfg.train.update(dict(seq_len=seq_len, log_every=10))
    cfg.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    cfg.checkpoint.every = 500


def stage(cfg: Any, big: bool, *, projector_only: bool, rows: int) -> None:
    """A stage's learning rate, batch size, template and schedule; `rows`: examples in an epoch of its data
    (sets `train.steps` of a big preset)."""
    r = PROJECTOR_STAGE if projector_only else LATER_STAGE
    cfg.optim.update(dict(lr=r["lr"], warmup_frac=0.03, min_lr_ratio=0.0))
    cfg.data.template = r["template"]
    if big:
        cfg.train.batch_size = r["batch_size"]
        cfg.train.steps = math.ceil(rows / r["batch_size"])


def stage_start(kind: str, arg: str) -> tuple[Any, str, bool]:
    """The common start of a stage config `configs/<kind>.py:STAGE[,PRESET]`: the base config with the model
    kind and the preset applied; returns (config, stage, whether the preset is big)."""
    from mm.train.schema import base_config

    stage_name, _, preset = arg.partition(",")
    preset = preset or "tiny"
    c = base_config()
    c.name = f"{kind}_{stage_name}_{preset}"
    c.model.kind = kind
    apply(c, preset)
    return c, stage_name, preset != "tiny"
