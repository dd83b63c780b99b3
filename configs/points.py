"""POINTS-style training with the ViT inside the step (DESIGN.md section 4): `configs/points.py:STAGE[,K]`.

- `vit_last_k` (VL pre-training): the general ViT's last K layers (default 3) *up to the feature layer*
  (features come from the penultimate layer, so the last layer gets no gradient and stays frozen) and the
  projector train; embeddings, earlier ViT layers and the LLM are frozen. Freezing works per layer.
- `instruct`: projector + LLM train at 2e-5, the ViT is frozen.
Tiny shapes by default (the dual-encoder merge and pixel shuffle of POINTS are not part of this trainer yet).
"""

from mm.train import presets
from mm.train.schema import base_config


def get_config(arg: str = "vit_last_k"):
    stage, _, k = arg.partition(",")
    k = int(k or 3)
    c = base_config()
    c.name = f"points_{stage}"
    c.model.kind = "vlm"
    c.data.kind = "synthetic_mm"
    presets.apply(c, "tiny")
    n = c.model.vision.num_layers
    feature_layer = n + c.model.vision_select_layer + 1  # layers 0..feature_layer-1 produce the features
    if stage == "vit_last_k":
        if not 0 < k <= feature_layer:
            raise ValueError(f"configs/points.py: K={k} must be in [1, {feature_layer}]")
        layers = "|".join(str(i) for i in range(feature_layer - k, feature_layer))
        c.param_groups = ((f"vision/encoder/layers_({layers})/.*", 1.0), ("projector/.*", 1.0),
                          ("(vision|llm)/.*", "frozen"))
        c.optim.lr = 1e-4
    elif stage == "instruct":
        c.param_groups = (("projector/.*", 1.0), ("llm/.*", 1.0), ("vision/.*", "frozen"))
        c.optim.lr = 2e-5
    else:
        raise ValueError(f"configs/points.py: unknown stage {stage!r}; choose vit_last_k or instruct")
    return c
