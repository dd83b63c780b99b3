"""Model soups end to end in the demo's world: `mm-train --config=configs/soups.py --workdir=/tmp/mm-soups`.

A base LLM and a shared IAA start learn the demo's data; IAA branches are then fine-tuned from that start on
different mixtures of question kinds (colour-, count- and grounding-heavy); `mm.soup` makes the average,
maximum and greedy soups of the branches, chosen on a validation split; the start, every ingredient and every
soup are evaluated on the test split. `demo_app/soups_run.py` describes the stages, splits and layout;
`WORKDIR/soups.md` (with `plots/soups.png`) is the report. `--config.quick=True` is the test's short version.

Variants: `configs/soups.py` (default) is the whole pipeline; `configs/soups.py:STAGE,WORKDIR` with STAGE in
base | start | a mixture's name is that stage's ordinary training config.
"""

import ml_collections


def get_config(arg: str = ""):
    from configs import demo

    c = demo.get_config()  # the demo's world: data generator, tiny LLM, frozen random ViT, eval settings
    c.pipeline = "soups"
    c.data.mm_train_images = 1000  # the shared start's data
    c.base.steps = 300
    c.mm.steps = 400  # the shared start
    c.val_images = 40  # the validation split soups are chosen on (the test split is data.mm_eval_images)
    c.mixtures = ml_collections.ConfigDict(dict(
        colour_heavy=dict(kinds=("colour", "shape"), images=400),
        count_heavy=dict(kinds=("count", "position"), images=400),
        grounding_heavy=dict(kinds=("grounding", "colour", "count"), images=400, grounding_rate=1.0),
    ))
    c.ingredient = dict(steps=120, lr=5e-4)  # each branch, from the start
    c.soup = dict(methods=("average", "maximum", "greedy"), top_p=2, accept="ge")
    c = ml_collections.ConfigDict(c)
    if arg:
        from demo_app.soups_run import stage_config

        stage, _, workdir = arg.partition(",")
        return stage_config(c, stage, workdir or "/tmp/mm-soups")
    return c
