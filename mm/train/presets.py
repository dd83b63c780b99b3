"""Model presets for the stage configs: Llama-3-8B shapes (IAA-14, IAA-8, LLaVA baseline) and tiny ones.

`apply(cfg, name)` fills `cfg.model` (and batch/sequence sizes) in place. Positions and widths follow
DESIGN.md section 2: CLIP ViT-L/14-336 features (width 1024, 576 tokens), mlp2x_gelu projector.
"""

from __future__ import annotations

from typing import Any

IAA_14 = [0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31]
IAA_8 = [0, 1, 10, 11, 20, 21, 30, 31]  # DESIGN.md: a choice (positions not published)

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=[128001, 128009], pad_token_id=None, dtype="bfloat16", param_dtype="float32",
                 remat_policy="dots_no_batch")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512)

PRESETS = ("tiny", "llama3_8b", "iaa14_llama3_8b", "iaa8_llama3_8b")


def apply(cfg: Any, name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    if name == "tiny":
        cfg.model.llm.update(TINY)
        cfg.model.vision_width = 32
        cfg.model.iaa_positions = [0, 1]
        cfg.train.update(dict(steps=20, batch_size=8, seq_len=32, log_every=1))
        cfg.data.num_image_tokens = 4
        cfg.checkpoint.every = 10
        return
    cfg.model.llm.update(LLAMA3_8B)
    cfg.model.vision_width = 1024
    cfg.model.iaa_positions = IAA_8 if name.startswith("iaa8") else IAA_14
    cfg.train.update(dict(seq_len=2048, log_every=10))
    cfg.data.num_image_tokens = 576
    cfg.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    cfg.checkpoint.every = 500


def stage_start(kind: str, arg: str) -> tuple[Any, str, bool]:
    """The common start of a stage config `configs/<kind>.py:STAGE[,PRESET]`: the base config with the model
    kind, synthetic multimodal data and the preset applied; returns (config, stage, whether the preset is big)."""
    from mm.train.config import base_config

    stage, _, preset = arg.partition(",")
    preset = preset or "tiny"
    c = base_config()
    c.name = f"{kind}_{stage}_{preset}"
    c.model.kind = kind
    c.data.kind = "synthetic_mm"
    apply(c, preset)
    return c, stage, preset != "tiny"
