"""The "vlm" family: mm checkpoint directories of IAA or LLaVA-style VLMs with their vision tower.

Same layout as every mm checkpoint (`mm_config.json`, Orbax `params/`, `tokenizer/`): the config section
"vlm" holds `mm.config.vlm_config_to_json`; params are the flat VLM tree (`vision`, and `base`/`mm`/`g` or
`llm`/`projector`), written one save unit (a decoder layer, an embedding, ...) at a time. HF Llava
directories (`llava_hf`) and IAA releases (`iaa_release`) open as this family; its HF form is whichever of
the two the model is.
"""

from __future__ import annotations

from pathlib import Path

from mm.checkpoints.name_map import NameMap
from mm.convert import hf_vision
from mm.convert.family import Family, Opened
from mm.config import IAAConfig, LLaVAConfig, VLMConfig, vlm_config_from_json, vlm_config_to_json, vlm_with_runtime

KIND = "vlm"


def _release_name_map(config: VLMConfig) -> NameMap:
    from mm.convert.iaa_release import RELEASE_VISION_PREFIX, release_name_map

    nm = release_name_map(config.lm)
    return NameMap(hf_vision.vision_entries(config.vision, RELEASE_VISION_PREFIX, ("vision",)) + list(nm.entries))


def _llava_name_map(config: VLMConfig) -> NameMap:
    from mm.convert.llava_hf import llava_name_map

    return llava_name_map(config)


def _write_release(opened: Opened, stage: Path, dst: Path, dtype: str, max_shard_bytes: int, progress: bool) -> None:
    from mm.convert.iaa_release import write_release

    config = opened.config
    write_release(config.lm, opened.reader, stage, dst, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  tokenizer_dir=opened.tokenizer_dir, vision_config=config.vision, progress=progress)


def _write_llava(opened: Opened, stage: Path, dst: Path, dtype: str, max_shard_bytes: int, progress: bool) -> None:
    from mm.convert.llava_hf import write_hf as write_llava

    write_llava(opened.config, opened.reader, stage, dtype, max_shard_bytes, opened.tokenizer_dir, progress)


# the LLM side's config type -> the VLM's HF layout: (name map, writer). IAA: the release layout with its tower
# in `dst/vision_tower/`; LLaVA-style: an HF Llava directory.
_HF_LAYOUTS = {IAAConfig: (_release_name_map, _write_release), LLaVAConfig: (_llava_name_map, _write_llava)}


# POINTS' OCR tower (`ocr_vision/`): HF CLIP vision names under this prefix (a choice: neither HF Llava nor the IAA
# release has a second tower, so these names only ever live inside mm dirs)
OCR_VISION_PREFIX = "model.ocr_vision_tower.vision_model."


def vlm_name_map(config: VLMConfig) -> NameMap:
    """The VLM's params with HF-style names (IAA: release names; LLaVA: HF Llava names; POINTS' OCR tower:
    `OCR_VISION_PREFIX`)."""
    nm = _HF_LAYOUTS[type(config.lm)][0](config)
    if config.ocr_vision is None:
        return nm
    return NameMap(list(nm.entries) + hf_vision.vision_entries(config.ocr_vision, OCR_VISION_PREFIX, ("ocr_vision",)),
                   nm.ignorable, nm.ignorable_mm)


def write_hf(opened: Opened, stage: Path, dst: Path, dtype: str, max_shard_bytes: int, progress: bool) -> None:
    """An mm "vlm" directory as HF files (see `_HF_LAYOUTS`)."""
    c = opened.config
    if c.ocr_vision is not None or c.pixel_shuffle:
        from mm.checkpoints.errors import ConversionError

        raise ConversionError(f"{opened.directory}: a POINTS model (OCR tower / pixel shuffle) has no HF layout here; "
                              "load the mm dir with mm.from_pretrained")
    _HF_LAYOUTS[type(c.lm)][1](opened, stage, dst, dtype, max_shard_bytes, progress)


FAMILY = Family(
    name="VLM (IAA / LLaVA-style)", handle="vlm", kind=KIND, name_map=vlm_name_map,
    parse=lambda d, source: vlm_config_from_json(dict(d), source), to_json=vlm_config_to_json,
    with_param_dtype=lambda c, dt: vlm_with_runtime(c, param_dtype=dt), write_hf=write_hf)
