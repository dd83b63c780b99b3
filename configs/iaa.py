"""Inner-Adaptor Architecture stages (DESIGN.md section 2): `configs/iaa.py:STAGE[,PRESET]`.

Stages (the LLM and the original embedding/norm/head stay frozen throughout):
- `stage1`: the `mm` branch's projector only (lr 1e-3, batch 256);
- `stage2` (= instruction tuning): projector, insertion layers, MM-EL, new norm, new head (lr 2e-5, batch 128);
- `grounding`: branch `g` (all of it), the trained `mm` branch loaded and frozen.
Presets: `tiny` (default), `iaa14_llama3_8b`, `iaa8_llama3_8b`. Each stage starts from the previous one with
`--config.init.checkpoint=<previous workdir>` and from a converted LLM with `--config.init.llm_checkpoint=`.
"""

from mm.train import presets


def get_config(arg: str = "stage1"):
    c, stage, big = presets.stage_start("iaa", arg)
    if stage == "stage1":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/projector/.*", 1.0), ("(base|mm)/.*", "frozen")]
        c.optim.lr = 1e-3
        c.train.batch_size = 256 if big else 8
    elif stage == "stage2":
        c.model.iaa_branches = ["mm"]
        c.param_groups = [("mm/.*", 1.0), ("base/.*", "frozen")]
        c.optim.lr = 2e-5
        c.train.batch_size = 128 if big else 8
    elif stage == "grounding":
        c.model.iaa_branches = ["mm", "g"]
        c.model.iaa_workflow = "g"
        c.param_groups = [("g/.*", 1.0), ("(base|mm)/.*", "frozen")]
        c.optim.lr = 2e-5
        c.train.batch_size = 128 if big else 8
    else:
        raise ValueError(f"configs/iaa.py: unknown stage {stage!r}; choose stage1, stage2, grounding")
    return c
