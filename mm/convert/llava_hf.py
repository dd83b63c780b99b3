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


from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import convert
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import IDENTITY, TRANSPOSE, Entry, NameMap
from mm.checkpoints.readers import Reader, SafetensorsReader, TreeReader
from mm.checkpoints.staging import staged_output
from mm.checkpoints.writers import SafetensorsWriter
from mm.config import ConfigError, LLMConfig, read_json
from mm.convert.family import Opened
from mm.convert.hf_vision import LLAVA_TOWER_CONTAINER, detect_vision_prefix, vision_config_from_hf, vision_entries
from mm.convert.llm_family import llm_entries, llm_ignorable, tokenizer_dir_of
from mm.config import ProjectorConfig
from mm.config import LLaVAConfig
from mm.config import VLMConfig

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
    position_ids = re.escape(vision_prefix) + r"embeddings\.position_ids"
    return NameMap(entries, llm_ignorable(lm.llm, LLM_PREFIX) + [position_ids])


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


def open_hf(directory: Path) -> Opened:
    """An HF Llava directory, as a "vlm" model (the registry sets the family)."""
    config = read_llava_config(directory)
    reader = SafetensorsReader(directory)
    try:
        prefix = detect_vision_prefix(reader.tensors(), str(directory), containers=(LLAVA_TOWER_CONTAINER,))
    except ConversionError:
        reader.close()
        raise
    return Opened(None, config, reader, llava_name_map(config, prefix), directory, tokenizer_dir_of(directory),
                  "HF Llava")


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


def write_hf(config: VLMConfig, reader: Reader, stage: Path, dtype: str, max_shard_bytes: int,
             tokenizer_dir: Path | None, progress: bool = False) -> None:
    """A LLaVA-style VLM's params (`reader`, mm side) as an HF Llava directory in `stage`."""
    writer = SafetensorsWriter(stage, max_shard_bytes)
    convert(reader, llava_name_map(config), writer, dtype=dtype, progress=progress, desc="mm-to-hf")
    torch_dtype = str(next(p.dtype for p in writer.plan if p.key == f"{LLM_PREFIX}model.norm.weight"))
    (stage / "config.json").write_text(json.dumps(llava_hf_config(config, torch_dtype), indent=2))
    if tokenizer_dir is not None:
        mmd.copy_files(Path(tokenizer_dir), stage, mmd.TOKENIZER_FILES)


def export_llava(config: VLMConfig, params: Mapping[str, Any], dst: str | Path, *, dtype: str | None = None,
                 overwrite: bool = False, tokenizer_dir: str | Path | None = None,
                 max_shard_bytes: int = 5 * 10**9) -> Path:
    """Writes a directory `LlavaForConditionalGeneration.from_pretrained` loads (config + safetensors)."""
    with staged_output(dst, overwrite) as stage:
        write_hf(config, TreeReader(params), stage, dtype or "keep", max_shard_bytes,
                 None if tokenizer_dir is None else Path(tokenizer_dir))
    return Path(dst)
