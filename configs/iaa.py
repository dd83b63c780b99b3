"""Inner-Adaptor Architecture stages (DESIGN.md section 2): `configs/iaa.py:STAGE[,PRESET]`.

The paper's four stages, in order; the LLM, its original embedding / norm / head and the ViT stay frozen in all:
- `stage1`: the `mm` branch's projector only, on captions (lr 1e-3, batch 256, `plain` template);
- `stage2`: the whole `mm` branch - projector, insertion layers, MM-EL, new norm, new head - pre-trained on
  captions (lr 2e-5, batch 128, `chat` template);
- `instruct`: the same `mm` branch tuned on instruction data (lr 2e-5, batch 128, `chat`);
- `grounding`: branch `g` (all of it) on grounding data, the trained `mm` branch loaded and frozen (lr 2e-5,
  batch 128, `chat`).
`stage2` and `instruct` train the same parameters; what differs is the data each is given (`data.path`).
Presets: `tiny` (default; synthetic features), `iaa14_llama3_8b`, `iaa8_llama3_8b` (the release setup, see
`mm/train/presets.py`). Each stage starts from the previous one with `--config.init.checkpoint=<previous
workdir>`; stage 1 from the LLM with `--config.init.llm_checkpoint=` (and the ViT with
`--config.init.vision_checkpoint=`).
"""

from mm.train import presets

STAGES = ("stage1", "stage2", "instruct", "grounding")


def get_config(arg: str = "stage1"):
    c, stage, big = presets.stage_start("iaa", arg)
    if stage == "stage1":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/projector/.*", 1.0), ("(base|mm|vision)/.*", "frozen")]
        presets.stage(c, big, projector_only=True, rows=presets.CAPTION_ROWS)
    elif stage in ("stage2", "instruct"):
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/.*", 1.0), ("(base|vision)/.*", "frozen")]
        presets.stage(c, big, projector_only=False,
                      rows=presets.CAPTION_ROWS if stage == "stage2" else presets.INSTRUCT_ROWS)
    elif stage == "grounding":
        c.model.iaa_branches = ["mm", "g"]
        c.model.iaa_workflow = "g"
        c.param_groups = [("g/.*", 1.0), ("(base|mm|vision)/.*", "frozen")]
        presets.stage(c, big, projector_only=False, rows=presets.INSTRUCT_ROWS)
    else:
        raise ValueError(f"configs/iaa.py: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return c
