"""HF `LlavaForConditionalGeneration` directories <-> mm LLaVA-style VLMs (`mm.models.vlm` with a LLaVAConfig).

On disk transformers 5 writes `vision_tower.*` for the CLIP / SigLIP tower (4.x and hub checkpoints:
`vision_tower.vision_model.*`; import accepts both through `hf_vision.detect_vision_prefix`, export writes the
former),
`multi_modal_projector.linear_{1,2}.*` (Linear, GELU, Linear), `language_model.model.*` and
`language_model.lm_head.weight`. mm params: `vision/...`, `projector/linear_{0,1}/...`, `llm/...`.
Config mapping: `vision_feature_layer` -> `feature_layer`; `vision_feature_select_strategy` "default" (drop
the class token) -> "patch", "full" -> "cls_patch"; `projector_hidden_act` must be "gelu" (mlp2x_gelu);
`image_token_index` -> `image_token_id`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mm.config import ConfigError, LLMConfig, read_json
from mm.convert import mm_dir as mmd
from mm.convert.errors import ConversionError
from mm.convert.hf_vision import LLAVA_TOWER_CONTAINER, detect_vision_prefix, vision_config_from_hf, vision_entries
from mm.convert.export import write_hf_tensors
from mm.convert.llm_map import llm_entries, llm_ignorable
from mm.convert.name_map import IDENTITY, TRANSPOSE, Entry, NameMap
from mm.convert.pipeline import open_hf_checkpoint, read_params, staged_output
from mm.models.connectors import ProjectorConfig
from mm.models.llava import LLaVAConfig
from mm.models.vlm import VLMConfig

VISION_PREFIX = LLAVA_TOWER_CONTAINER  # what export writes
PROJECTOR_PREFIX = "multi_modal_projector."
LLM_PREFIX = "language_model."
_STRATEGY = {"default": "patch", "full": "cls_patch"}


def llava_name_map(config: VLMConfig, vision_prefix: str = VISION_PREFIX) -> NameMap:
    if config.is_iaa:
        raise ConversionError("an IAA model has no LlavaForConditionalGeneration layout (use the IAA release export)")
    lm: LLaVAConfig = config.lm
    if lm.projector.kind != "mlp2x_gelu":
        raise ConversionError(f"HF Llava has a 2-layer GELU projector; this model's is {lm.projector.kind!r}")
    entries = vision_entries(config.vision, vision_prefix, ("vision",))
    for k, (hf_k, in_dim) in enumerate(((1, lm.projector.in_dim), (2, lm.projector.out_dim))):
        base = f"{PROJECTOR_PREFIX}linear_{hf_k}."
        path = ("projector", f"linear_{k}")
        entries.append(Entry(base + "weight", (lm.projector.out_dim, in_dim), path + ("kernel",), TRANSPOSE))
        entries.append(Entry(base + "bias", (lm.projector.out_dim,), path + ("bias",), IDENTITY))
    entries += llm_entries(lm.llm, hf_prefix=LLM_PREFIX, mm_prefix=("llm",))
    return NameMap(entries, llm_ignorable(lm.llm, LLM_PREFIX) + [re.escape(vision_prefix) + r"embeddings\.position_ids"])


def read_llava_config(src: str | Path, **runtime: Any) -> VLMConfig:
    path = Path(src) / "config.json"
    d = read_json(path)
    if d.get("model_type") != "llava":
        raise ConversionError(f"{path}: model_type={d.get('model_type')!r}, expected 'llava'")
    try:
        llm = LLMConfig.from_hf_dict(d["text_config"], source=f"{path}: text_config", **runtime)
        vis = vision_config_from_hf(d["vision_config"], source=f"{path}: vision_config")
    except (ConfigError, KeyError) as e:
        raise ConversionError(f"{path}: {e}") from e
    if d.get("projector_hidden_act", "gelu") != "gelu" or not d.get("multimodal_projector_bias", True):
        raise ConversionError(f"{path}: only a biased GELU projector is supported "
                              f"(projector_hidden_act={d.get('projector_hidden_act')!r})")
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"{path}: vision_feature_layer={layer!r}: only a single layer is supported")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in _STRATEGY:
        raise ConversionError(f"{path}: vision_feature_select_strategy={strategy!r}")
    proj = ProjectorConfig(kind="mlp2x_gelu", in_dim=vis.hidden_size, out_dim=llm.hidden_size)
    return VLMConfig(vision=vis, lm=LLaVAConfig(llm=llm, projector=proj), feature_layer=layer,
                     feature=_STRATEGY[strategy], image_token_id=int(d.get("image_token_index", 32000)))


def load_llava(src: str | Path, param_dtype: str = "float32") -> tuple[VLMConfig, dict[str, Any]]:
    """An HF Llava directory -> (VLMConfig, params) with numpy arrays in `param_dtype`."""
    from mm.convert.safetensors_io import SafetensorsCheckpoint

    config = read_llava_config(src, param_dtype=param_dtype)
    with SafetensorsCheckpoint(src) as probe:
        prefix = detect_vision_prefix(probe.tensors, str(src), containers=(LLAVA_TOWER_CONTAINER,))
    name_map = llava_name_map(config, prefix)
    with open_hf_checkpoint(src, name_map) as ckpt:
        return config, read_params(ckpt, name_map, param_dtype)


def llava_hf_config(config: VLMConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    strategy = {v: k for k, v in _STRATEGY.items()}[config.feature]
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": config.lm.llm.to_hf_dict(torch_dtype), "vision_config": config.vision.to_hf_dict(torch_dtype),
        "image_token_index": config.image_token_id, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "vision_feature_layer": config.feature_layer,
        "vision_feature_select_strategy": strategy, "image_seq_length": config.tokens_per_image,
        "tie_word_embeddings": config.lm.llm.tie_word_embeddings, "dtype": torch_dtype,
    }


def export_llava(config: VLMConfig, params: Mapping[str, Any], dst: str | Path, *, dtype: str | None = None,
                 overwrite: bool = False, tokenizer_dir: str | Path | None = None,
                 max_shard_bytes: int = 5 * 10**9) -> Path:
    """Writes a directory `LlavaForConditionalGeneration.from_pretrained` loads (config + safetensors)."""
    name_map = llava_name_map(config)
    with staged_output(dst, overwrite) as stage:
        torch_dtype = str(np.dtype(dtype or np.asarray(params["llm"]["norm"]["scale"]).dtype))
        (stage / "config.json").write_text(json.dumps(llava_hf_config(config, torch_dtype), indent=2))
        if tokenizer_dir is not None:
            mmd.copy_files(Path(tokenizer_dir), stage, mmd.TOKENIZER_FILES)
        write_hf_tensors(stage, name_map, params, dtype, max_shard_bytes)
    return Path(dst)
