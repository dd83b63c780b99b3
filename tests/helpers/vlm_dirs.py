"""A tiny IAA VLM (ViT + `mm` and `g` branches) saved as an mm `vlm` dir, for the handle tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PH = 5  # the placeholder id its prompts carry, one per image


def tiny_iaa_vlm(path: Path, scale: float = 1.0) -> tuple[Path, Any, Any]:
    """(dir, VLMConfig, params) of a random tiny IAA VLM; matrices scaled by `scale` (larger than init's 0.02
    makes logits large enough for bf16 rounding to show)."""
    import jax

    from mm.config import LLMConfig, VisionConfig
    from mm.convert import registry
    from mm.models import iaa, kinds, llm, vision, vlm
    from mm.config import ProjectorConfig

    vc = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28, patch_size=14)
    lc = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, eos_token_id=(2,))
    proj = ProjectorConfig(in_dim=16, out_dim=32)
    cfg = vlm.VLMConfig(vision=vc, lm=iaa.IAAConfig(llm=lc, branches=(iaa.BranchConfig("mm", (0, 2), proj),
                                                                     iaa.BranchConfig("g", (1,), proj))),
                        image_token_id=PH)
    params = kinds.of(cfg).init_params(jax.random.PRNGKey(2), llm.init_params(lc, jax.random.PRNGKey(1)),
                                       vision.init_params(vc, jax.random.PRNGKey(0)))
    if scale != 1.0:
        params = jax.tree.map(lambda x: np.asarray(x) * scale if x.ndim > 1 else np.asarray(x), params)
    return registry.save("vlm", cfg, params, path), cfg, params


def tiny_iaa_vlm_with_tokenizer(path: Path, scale: float = 3.0) -> Path:
    """`tiny_iaa_vlm` with the tiny test tokenizer beside it and its own `<image>` (id 4) as the placeholder, as
    with a real tokenizer (the default id 5 is "," in that vocabulary, so plain text would hold placeholders)."""
    from tests.helpers.tokenizer import make_tokenizer

    model, _, _ = tiny_iaa_vlm(path, scale=scale)
    make_tokenizer(64).save_pretrained(str(model))
    cfg = model / "mm_config.json"
    cfg.write_text(cfg.read_text().replace(f'"image_token_id": {PH}', '"image_token_id": 4'))
    return model


def tiny_llm_and_iaa(path: Path, scale: float = 3.0) -> tuple[Path, Path]:
    """(base LLM dir, IAA VLM dir) where the IAA's frozen base is that LLM, param for param, both with the tiny
    test tokenizer (placeholder `<image>`, id 4): an IAA model and the LLM it was built on."""
    import jax

    from mm.convert import registry
    from tests.helpers.tokenizer import make_tokenizer

    model = tiny_iaa_vlm_with_tokenizer(path / "iaa", scale=scale)
    cfg, params = tiny_iaa_vlm(path / "_scratch", scale=scale)[1:]  # the same seeds: the same params
    llm_dir = registry.save("llm", cfg.lm.llm, jax.tree.map(np.asarray, params["base"]), path / "llm")

    make_tokenizer(64).save_pretrained(str(llm_dir))
    return llm_dir, model
