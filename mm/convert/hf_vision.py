"""Name map of the ViT towers: HF `CLIPVisionModel` / `SiglipVisionModel` (and the vision tower inside
`CLIPModel` / `SiglipModel` or a LLaVA/IAA checkpoint) <-> `mm.models.vision.VisionTower` params.

Where the tower's tensors sit: inside a container (`TOWER_CONTAINERS`: the IAA release's
`model.vision_tower.vision_tower.`, HF Llava's `vision_tower.`, or nothing for a standalone directory), either
under the `vision_model.` module (hub checkpoints, transformers 4, full `CLIPModel` / `SiglipModel`) or directly
(transformers >= 5.24 saves `CLIPVisionModel` / `SiglipVisionModel` without it: `embeddings.class_embedding`).
`detect_vision_prefix` is the one place that decides, from the tensor names, for every reader (standalone,
Llava, IAA release). Everything outside the tower (text model, projections, `logit_scale`/`logit_bias`) is
ignorable, so a full `CLIPModel` / `SiglipModel` converts to its vision tower. Export writes the hub layout
(`vision_model.` prefix, `CLIPVisionModel` / `SiglipVisionModel` config), which both transformers 4 and 5 load.

Transforms: conv `patch_embedding.weight [D, C, p, p]` <-> kernel `[p, p, C, D]`; q/k/v/out projections
split heads like the LLM map; SigLIP's pooling head keeps torch `MultiheadAttention`'s fused
`in_proj_weight [3D, D]` as one param `[D, 3, H, hd]`, so every entry is one tensor <-> one param and
round trips are exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import convert
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import (IDENTITY, TRANSPOSE, Entry, MMPath, NameMap, SplitHeadsBias, SplitHeadsIn,
                                     SplitHeadsOut, Transform)
from mm.checkpoints.readers import SafetensorsReader, TreeReader
from mm.checkpoints.writers import SafetensorsWriter, TreeWriter
from mm.config import ConfigError, VisionConfig, read_json
from mm.convert.family import Family, Opened

TOWER_MODULE = "vision_model."  # the tower's sub-module name in hub checkpoints; absent in transformers >= 5.24 saves
RELEASE_TOWER_CONTAINER = "model.vision_tower.vision_tower."  # the IAA release
LLAVA_TOWER_CONTAINER = "vision_tower."  # HF LlavaForConditionalGeneration
TOWER_CONTAINERS = (RELEASE_TOWER_CONTAINER, LLAVA_TOWER_CONTAINER, "")  # "" last: a standalone tower
PATCH_EMBED = "embeddings.patch_embedding.weight"  # every CLIP / SigLIP tower has it; it locates the tower
HF_EXPORT_PREFIX = TOWER_MODULE
VISION_KIND = "vision"  # mm checkpoint kind: mm_config.json {"kind": "vision", "vision": VisionConfig...}
HF_FILES = ("preprocessor_config.json",)


class ConvToHWIO(Transform):
    """torch `Conv2d.weight [out, in, kh, kw]` <-> Flax kernel `[kh, kw, in, out]`."""

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        o, i, kh, kw = hf_shape
        return (kh, kw, i, o)

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True, repr=False)
class FusedInProj(Transform):
    """torch `MultiheadAttention.in_proj_weight [3*H*hd, D]` <-> `[D, 3, H, hd]`; bias `[3*H*hd]` <-> `[3, H, hd]`."""

    heads: int

    def mm_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        hd = hf_shape[0] // (3 * self.heads)
        return (3, self.heads, hd) if len(hf_shape) == 1 else (hf_shape[1], 3, self.heads, hd)

    def to_mm(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 1:
            return x.reshape(self.mm_shape(x.shape))
        return np.ascontiguousarray(x.T).reshape(self.mm_shape(x.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:
            return x.reshape(-1)
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


CONV = ConvToHWIO()


def vision_entries(c: VisionConfig, hf_prefix: str = HF_EXPORT_PREFIX, mm_prefix: MMPath = ()) -> list[Entry]:
    """The tower's entries in canonical order (embeddings, pre-norm, layers 0..N-1, post-norm, head)."""
    d, f, h, p = c.hidden_size, c.intermediate_size, c.num_heads, c.patch_size
    siglip = not c.has_class_token

    def e(name: str, shape: tuple[int, ...], path: MMPath, t: Transform = IDENTITY) -> Entry:
        return Entry(hf_prefix + name, shape, mm_prefix + path, t)

    def norm(hf: str, path: MMPath) -> list[Entry]:
        return [e(f"{hf}.weight", (d,), path + ("scale",)), e(f"{hf}.bias", (d,), path + ("bias",))]

    def mlp(hf: str, path: MMPath) -> list[Entry]:
        return [e(f"{hf}.fc1.weight", (f, d), path + ("fc1", "kernel"), TRANSPOSE),
                e(f"{hf}.fc1.bias", (f,), path + ("fc1", "bias")),
                e(f"{hf}.fc2.weight", (d, f), path + ("fc2", "kernel"), TRANSPOSE),
                e(f"{hf}.fc2.bias", (d,), path + ("fc2", "bias"))]

    emb = ("embeddings",)
    out = []
    if not siglip:
        out.append(e("embeddings.class_embedding", (d,), emb + ("class_embedding",)))
    out.append(e("embeddings.patch_embedding.weight", (d, c.num_channels, p, p), emb + ("patch_embedding", "kernel"),
                 CONV))
    if siglip:
        out.append(e("embeddings.patch_embedding.bias", (d,), emb + ("patch_embedding", "bias")))
    out.append(e("embeddings.position_embedding.weight", (c.num_positions, d), emb + ("position_embedding",
                                                                                        "embedding")))
    if not siglip:
        out += norm("pre_layrnorm", ("pre_layrnorm",))
    for i in range(c.num_layers):
        L, P = f"encoder.layers.{i}.", ("encoder", f"layers_{i}")
        att = P + ("self_attn",)
        for proj in ("q_proj", "k_proj", "v_proj"):
            out.append(e(f"{L}self_attn.{proj}.weight", (d, d), att + (proj, "kernel"), SplitHeadsIn(h)))
            out.append(e(f"{L}self_attn.{proj}.bias", (d,), att + (proj, "bias"), SplitHeadsBias(h)))
        out.append(e(f"{L}self_attn.out_proj.weight", (d, d), att + ("out_proj", "kernel"), SplitHeadsOut(h)))
        out.append(e(f"{L}self_attn.out_proj.bias", (d,), att + ("out_proj", "bias")))
        out += norm(f"{L}layer_norm1", P + ("layer_norm1",))
        out += mlp(f"{L}mlp", P + ("mlp",))
        out += norm(f"{L}layer_norm2", P + ("layer_norm2",))
    out += norm("post_layernorm", ("post_layernorm",))
    if c.use_head:
        hp = ("head",)
        out.append(e("head.probe", (1, 1, d), hp + ("probe",)))
        out.append(e("head.attention.in_proj_weight", (3 * d, d), hp + ("attention", "in_proj", "kernel"),
                     FusedInProj(h)))
        out.append(e("head.attention.in_proj_bias", (3 * d,), hp + ("attention", "in_proj", "bias"), FusedInProj(h)))
        out.append(e("head.attention.out_proj.weight", (d, d), hp + ("attention", "out_proj", "kernel"),
                     SplitHeadsOut(h)))
        out.append(e("head.attention.out_proj.bias", (d,), hp + ("attention", "out_proj", "bias")))
        out += norm("head.layernorm", hp + ("layernorm",))
        out += mlp("head.mlp", hp + ("mlp",))
    return out


def vision_ignorable(hf_prefix: str = HF_EXPORT_PREFIX, owned: str | None = None, namespace: str = "") -> list[str]:
    """HF names dropped on import: everything outside the part of the checkpoint the tower owns (`owned`,
    default `hf_prefix`: CLIPModel / SiglipModel text side, projections, logit scale/bias, an LLM beside it),
    and the non-persistent `position_ids` buffer older exports contain. `namespace`: the reader's prefix on
    every name of this checkpoint (`readers.SafetensorsReader(namespace=)`), outside which nothing is dropped."""
    hp, own = re.escape(hf_prefix), re.escape(hf_prefix if owned is None else owned)
    pats = [rf"{hp}embeddings\.position_ids"]
    if own:
        pats.append(rf"(?!{own}).*")  # anything not under the owned prefix
    else:
        pats += [r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_(scale|bias)"]
    return [re.escape(namespace) + p for p in pats]


def vision_name_map(config: VisionConfig, hf_prefix: str = HF_EXPORT_PREFIX, owned: str | None = None,
                    mm_prefix: MMPath = (), namespace: str = "") -> NameMap:
    """The name map of a vision tower stored under `hf_prefix` (in a checkpoint whose names under `owned`,
    default `hf_prefix`, all belong to the tower), at `mm_prefix` in the mm tree; `namespace` as in
    `vision_ignorable` (it prefixes `hf_prefix` too)."""
    return NameMap(vision_entries(config, namespace + hf_prefix, mm_prefix),
                   vision_ignorable(hf_prefix, owned, namespace))


def tower_prefixes(containers: Iterable[str] = TOWER_CONTAINERS) -> list[str]:
    """Every accepted tower prefix, in detection order: per container, with `vision_model.` and without."""
    return [p for c in containers for p in (c + TOWER_MODULE, c)]


def detect_vision_prefix(names: Iterable[str], source: str = "checkpoint",
                         containers: Iterable[str] = TOWER_CONTAINERS, required: bool = True) -> str | None:
    """The prefix under which a checkpoint stores the tower, found from its patch-embedding tensor: inside
    one of `containers`, with or without the `vision_model.` module. None when absent and not `required`."""
    names = set(names)
    prefixes = tower_prefixes(containers)
    for prefix in prefixes:
        if prefix + PATCH_EMBED in names:
            return prefix
    if not required:
        return None
    raise ConversionError(f"{source}: no vision tower found (no '{PATCH_EMBED}' under any of the prefixes "
                          f"{[p or '<none>' for p in prefixes]})")


def vision_config_from_hf(d: Mapping, source: str = "config.json", **runtime) -> VisionConfig:
    """`VisionConfig` from a CLIP / SigLIP vision config, a full CLIP / SigLIP config, or a LLaVA-style config
    whose `vision_config` is a CLIP / SigLIP vision config."""
    if d.get("model_type") not in ("clip", "siglip", "clip_vision_model", "siglip_vision_model") and isinstance(
            d.get("vision_config"), Mapping):
        d = d["vision_config"]
    return VisionConfig.from_hf_dict(d, source, **runtime)


# ------------------------------------------------------------------------------ in-memory helpers
def hf_state_to_params(config: VisionConfig, tensors: Mapping[str, np.ndarray], source: str = "checkpoint",
                       hf_prefix: str | None = None) -> dict:
    """An in-memory HF state dict (numpy arrays) -> mm params, with names and shapes checked first."""
    prefix = detect_vision_prefix(tensors, source) if hf_prefix is None else hf_prefix
    return convert(TreeReader(tensors, source, side="hf"), vision_name_map(config, prefix), TreeWriter(),
                   progress=False)


def params_to_hf_state(config: VisionConfig, params: Mapping, hf_prefix: str = HF_EXPORT_PREFIX
                       ) -> dict[str, np.ndarray]:
    """mm params -> an HF state dict (numpy), under `hf_prefix`."""
    return convert(TreeReader(params, "mm params"), vision_name_map(config, hf_prefix), TreeWriter(side="hf"),
                   progress=False)


# ------------------------------------------------------------------------------------------ files
def read_hf_vision_config(hf_dir: str | Path, **runtime: Any) -> VisionConfig:
    """The tower's config from an HF directory's `config.json` (vision, full CLIP/SigLIP, or LLaVA-style)."""
    path = Path(hf_dir) / "config.json"
    try:
        return vision_config_from_hf(read_json(path), source=str(path), **runtime)
    except ConfigError as e:
        raise ConversionError(str(e)) from e


def is_vision_hf_config(d: Mapping[str, Any]) -> bool:
    """True for configs whose checkpoint this module converts (CLIP / SigLIP vision or full models)."""
    return d.get("model_type") in HF_MODEL_TYPES


def open_hf(directory: Path) -> Opened:
    """A standalone HF CLIP / SigLIP directory (or the tower of a full CLIPModel / SiglipModel)."""
    config = read_hf_vision_config(directory)
    reader = SafetensorsReader(directory)
    try:
        prefix = detect_vision_prefix(reader.tensors(), str(directory))
    except ConversionError:
        reader.close()
        raise
    return Opened(FAMILY, config, reader, vision_name_map(config, prefix), directory)


def write_hf(opened: Opened, stage: Path, dst: Path, dtype: str, max_shard_bytes: int, progress: bool
             ) -> None:
    """An mm "vision" directory as an HF `CLIPVisionModel` / `SiglipVisionModel` directory (tensors under
    `vision_model.`, which transformers 4 and 5 both load)."""
    from mm.convert.llm_family import hf_torch_dtype

    writer = SafetensorsWriter(stage, max_shard_bytes)
    convert(opened.reader, vision_name_map(opened.config), writer, dtype=dtype, progress=progress, desc="mm-to-hf")
    cfg = opened.config.to_hf_dict(torch_dtype=hf_torch_dtype(p.dtype for p in writer.plan))
    (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    mmd.copy_files(opened.directory, stage, HF_FILES)


HF_MODEL_TYPES = ("clip", "siglip", "clip_vision_model", "siglip_vision_model")
FAMILY = Family(
    name="vision tower (CLIP / SigLIP)", handle="vision", kind=VISION_KIND, name_map=vision_name_map,
    parse=lambda d, source: VisionConfig.from_json_dict(d, source=source), to_json=lambda c: c.to_json_dict(),
    with_param_dtype=lambda c, dt: c.replace(param_dtype=dt), hf_model_types=HF_MODEL_TYPES, open_hf=open_hf,
    write_hf=write_hf, hf_files=HF_FILES)
