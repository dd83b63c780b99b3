"""LLaVA-style bridge (DESIGN.md section 3): `configs/llava.py:STAGE[,PRESET]`.

Stages: `stage1` (projector only, lr 1e-3, batch 256), `stage2` (projector + LLM, lr 2e-5, batch 128),
`stage2_frozen` (projector only at stage-2 settings: the frozen-LLM baseline). Presets: `tiny` (default),
`llama3_8b`. Stage 2 starts from stage 1: `--config.init.checkpoint=<stage-1 workdir>`; the base LLM from a
converted checkpoint: `--config.init.llm_checkpoint=<HF or mm dir>`.
"""

from mm.train import presets


def get_config(arg: str = "stage1"):
    c, stage, big = presets.stage_start("llava", arg)
    if stage == "stage1":
        c.param_groups = [("projector/.*", 1.0), ("llm/.*", "frozen")]
        c.optim.lr = 1e-3
        c.train.batch_size = 256 if big else 8
    elif stage in ("stage2", "stage2_frozen"):
        c.param_groups = [("projector/.*", 1.0), ("llm/.*", 1.0 if stage == "stage2" else "frozen")]
        c.optim.lr = 2e-5
        c.train.batch_size = 128 if big else 8
    else:
        raise ValueError(f"configs/llava.py: unknown stage {stage!r}; choose stage1, stage2, stage2_frozen")
    return c
