"""LLaVA-style bridge (DESIGN.md section 3): `configs/llava.py:STAGE[,PRESET]`.

Stages (the ViT frozen in all):
- `stage1`: the projector only, on captions (lr 1e-3, batch 256, `plain` template);
- `stage2`: projector + LLM on instruction data (lr 2e-5, batch 128, `chat` template);
- `stage2_frozen`: the projector only at stage-2 settings (the frozen-LLM baseline).
Presets: `tiny` (default; synthetic features), `llama3_8b` (the release setup, see `mm/train/presets.py`).
Stage 2 starts from stage 1: `--config.init.checkpoint=<stage-1 workdir>`; stage 1 from the LLM with
`--config.init.llm_checkpoint=<HF or mm dir>` (and the ViT with `--config.init.vision_checkpoint=`).
"""

from mm.train import presets

STAGES = ("stage1", "stage2", "stage2_frozen")


def get_config(arg: str = "stage1"):
    c, stage, big = presets.stage_start("llava", arg)
    if stage == "stage1":
        c.param_groups = [("projector/.*", 1.0), ("(llm|vision)/.*", "frozen")]
        presets.stage(c, big, projector_only=True, rows=presets.CAPTION_ROWS)
    elif stage in ("stage2", "stage2_frozen"):
        c.param_groups = [("projector/.*", 1.0), ("llm/.*", 1.0 if stage == "stage2" else "frozen"),
                          ("vision/.*", "frozen")]
        presets.stage(c, big, projector_only=False, rows=presets.INSTRUCT_ROWS)
    else:
        raise ValueError(f"configs/llava.py: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return c
