"""The main job: `mm-train --config=configs/demo.py --workdir=/tmp/mm-demo` (README's first command).

Reproduces the Inner-Adaptor Architecture's claim on a 2-core CPU in minutes (DESIGN.md sections 1-3): a tiny
base LLM learns a text task (word reversal); an IAA model with that LLM frozen and a LLaVA-style model that
trains it learn the same synthetic shapes data (captions, colour / shape / count / position questions,
grounding boxes) on the same budget; all are exported to mm checkpoints, loaded with `mm.from_pretrained`
and evaluated; `WORKDIR/report.md` and PNG plots compare them. Everything is generated; nothing downloads.

Variants:
- `configs/demo.py` (default): the whole pipeline. `--config.quick=True` is a shortened run (tests).
- `configs/demo.py:STAGE,WORKDIR` with STAGE in base | iaa | llava: that stage's ordinary training config,
  reading the data the pipeline wrote under WORKDIR, e.g. to rerun a stage by hand with `mm-train`.
Real checkpoints: `--config.init.llm_checkpoint=<HF Llama/Qwen2 dir or mm dir>` (its tokenizer is used; the
base stage is skipped: the given LLM is the base) and `--config.init.vision_checkpoint=<HF CLIP/SigLIP dir or
mm vision dir>` (otherwise a seeded random ViT, the same for both models). Shapes then come from the checkpoints.
"""

import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.pipeline = "demo"
    c.seed = 0
    c.quick = False  # shortened run: fewer rows, steps and questions (the test of the whole pipeline)
    c.data = dict(text_train=3000, text_eval=200, mm_train_images=2000, mm_eval_images=60, min_side=40,
                  max_side=96, max_aspect=1.6, max_objects=2,
                  object_scale=(0.35, 0.5), rounds=(3, 5), vocab_size=512,
                  # captions exist in the data but are left out of training: long answers that dilute the
                  # short QA answers' share of the loss, and not evaluated
                  train_kinds=("colour", "shape", "count", "position", "grounding"), grounding_rate=0.35)
    c.model = dict(
        llm=dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0),
        # a random, frozen CLIP-style ViT: 48x48 tiles, 8x8 patches -> 36 image positions
        vision=dict(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=48, patch_size=8),
        vision_select_layer=-2,
        projector="mlp2x_gelu",
        # [] = after every frozen layer of an LLM of <= 4 layers, IAA-14's pattern on deeper ones (real checkpoints)
        iaa_positions=(),  # tuples: overridable from the command line, e.g. '(0, 2)'
    )
    c.init = dict(llm_checkpoint="", vision_checkpoint="", tokenizer="")
    c.base = dict(steps=400, batch_size=16, seq_len=128, lr=3e-3)
    c.mm = dict(steps=1000, batch_size=16, seq_len=160, lr=1e-3)  # IAA and LLaVA-style: the same budget
    c.eval = dict(max_new_tokens=24, batch_size=64)
    c = ml_collections.ConfigDict(c)
    if arg:
        from demo_app.stages import stage_config

        stage, _, workdir = arg.partition(",")
        return stage_config(c, stage, workdir or "/tmp/mm-demo")
    return c
