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
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mm.config import ConfigError, VisionConfig, read_json
from mm.convert.errors import ConversionError
from mm.convert.name_map import (IDENTITY, TRANSPOSE, Entry, MMPath, NameMap, SplitHeadsBias, SplitHeadsIn,
                                 SplitHeadsOut, Transform)

TOWER_MODULE = "vision_model."  # the tower's sub-module name in hub checkpoints; absent in transformers >= 5.24 saves
RELEASE_TOWER_CONTAINER = "model.vision_tower.vision_tower."  # the IAA release
LLAVA_TOWER_CONTAINER = "vision_tower."  # HF LlavaForConditionalGeneration
TOWER_CONTAINERS = (RELEASE_TOWER_CONTAINER, LLAVA_TOWER_CONTAINER, "")  # "" last: a standalone tower
PATCH_EMBED = "embeddings.patch_embedding.weight"  # every CLIP / SigLIP tower has it; it locates the tower
HF_EXPORT_PREFIX = TOWER_MODULE
VISION_KIND = "vision"  # mm checkpoint kind: mm_config.json {"kind": "vision", "vision": VisionConfig...}


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


def vision_ignorable(hf_prefix: str = HF_EXPORT_PREFIX, owned: str | None = None) -> list[str]:
    """HF names dropped on import: everything outside the part of the checkpoint the tower owns (`owned`,
    default `hf_prefix`: CLIPModel / SiglipModel text side, projections, logit scale/bias, an LLM beside it),
    and the non-persistent `position_ids` buffer older exports contain."""
    hp, own = re.escape(hf_prefix), re.escape(hf_prefix if owned is None else owned)
    pats = [rf"{hp}embeddings\.position_ids"]
    if own:
        pats.append(rf"(?!{own}).*")  # anything not under the owned prefix
    else:
        pats += [r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_(scale|bias)"]
    return pats


def vision_name_map(config: VisionConfig, hf_prefix: str = HF_EXPORT_PREFIX, owned: str | None = None) -> NameMap:
    """The name map of a vision tower stored under `hf_prefix` (in a checkpoint whose names under `owned`,
    default `hf_prefix`, all belong to the tower)."""
    return NameMap(vision_entries(config, hf_prefix), vision_ignorable(hf_prefix, owned))


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
def _get(tree: Mapping, path: MMPath) -> np.ndarray:
    for k in path:
        tree = tree[k]
    return tree


def hf_state_to_params(config: VisionConfig, tensors: Mapping[str, np.ndarray], source: str = "checkpoint",
                       hf_prefix: str | None = None) -> dict:
    """An in-memory HF state dict (numpy arrays) -> mm params, with names and shapes checked first."""
    from mm.convert.mm_dir import set_path
    from mm.convert.name_map import check_names_and_shapes

    prefix = detect_vision_prefix(tensors, source) if hf_prefix is None else hf_prefix
    nm = vision_name_map(config, prefix)
    check_names_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, nm, source)
    params: dict = {}
    for e in nm.entries:
        set_path(params, e.mm_path, e.transform.to_mm(np.asarray(tensors[e.hf_name])))
    return params


def params_to_hf_state(config: VisionConfig, params: Mapping, hf_prefix: str = HF_EXPORT_PREFIX) -> dict[str, np.ndarray]:
    """mm params -> an HF state dict (numpy), under `hf_prefix`."""
    out = {}
    for e in vision_entries(config, hf_prefix):
        try:
            x = np.asarray(_get(params, e.mm_path))
        except KeyError as err:
            raise ConversionError(f"mm params: missing {'/'.join(e.mm_path)}") from err
        if tuple(x.shape) != e.mm_shape:
            raise ConversionError(f"mm params: {'/'.join(e.mm_path)} has shape {list(x.shape)}, "
                                  f"expected {list(e.mm_shape)}")
        out[e.hf_name] = e.transform.to_hf(x)
    return out


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
    return d.get("model_type") in ("clip", "siglip", "clip_vision_model", "siglip_vision_model")


def hf_dir_is_vision(hf_dir: str | Path) -> bool:
    """Whether an HF directory's `config.json` is one this module converts (False when absent or unreadable:
    the caller's own reader then reports the problem)."""
    try:
        return is_vision_hf_config(read_json(Path(hf_dir) / "config.json"))
    except ConfigError:
        return False


def open_hf_vision(hf_dir: str | Path, config: VisionConfig) -> tuple[NameMap, Any]:
    from mm.convert.pipeline import open_hf_checkpoint
    from mm.convert.safetensors_io import SafetensorsCheckpoint

    with SafetensorsCheckpoint(hf_dir) as probe:
        prefix = detect_vision_prefix(probe.tensors, str(hf_dir))
    name_map = vision_name_map(config, prefix)
    return name_map, open_hf_checkpoint(hf_dir, name_map)


def load_hf_vision(hf_dir: str | Path, **runtime: Any) -> tuple[VisionConfig, dict[str, Any]]:
    """An HF CLIP / SigLIP checkpoint directory straight into `(VisionConfig, params)` (numpy, in the
    config's `param_dtype`). What `mm.from_pretrained` needs for a vision tower."""
    from mm.convert.pipeline import read_params

    config = read_hf_vision_config(hf_dir, **runtime)
    name_map, ckpt = open_hf_vision(hf_dir, config)
    with ckpt:
        return config, read_params(ckpt, name_map, config.param_dtype)


def hf_vision_to_mm(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
                    progress: bool = True) -> Path:
    """HF CLIP / SigLIP checkpoint (vision tower of it) -> mm checkpoint directory of kind "vision"."""
    from mm.convert import pipeline as pl

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    config = read_hf_vision_config(src)
    name_map, ckpt = open_hf_vision(src, config)
    return pl.stream_hf_to_mm(src, dst, ckpt, name_map, VISION_KIND, config, dtype=dtype, overwrite=overwrite,
                              progress=progress, extra_files=("preprocessor_config.json",))


def mm_vision_to_hf(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
                    progress: bool = True, max_shard_bytes: int | None = None) -> Path:
    """mm checkpoint of kind "vision" -> HF `CLIPVisionModel` / `SiglipVisionModel` directory (tensors under
    `vision_model.`, which transformers 4 and 5 both load)."""
    from mm.convert import mm_dir as mmd
    from mm.convert import pipeline as pl
    from mm.convert.safetensors_io import DEFAULT_SHARD_BYTES

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
    config = read_mm_vision_config(src)
    return pl.stream_mm_to_hf(src, dst, vision_name_map(config), config.to_hf_dict, dtype=dtype,
                              overwrite=overwrite, progress=progress,
                              max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
                              extras=lambda stage: mmd.copy_files(src, stage, ("preprocessor_config.json",)))


def read_mm_vision_config(mm_path: str | Path) -> VisionConfig:
    """The `VisionConfig` of an mm checkpoint of kind "vision"."""
    from mm.convert import mm_dir as mmd

    path = Path(mm_path) / mmd.MM_CONFIG_FILE
    try:
        d = read_json(path)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    if d.get("kind") != VISION_KIND or not isinstance(d.get(VISION_KIND), Mapping):
        raise ConversionError(f"{path}: not an mm vision checkpoint (kind={d.get('kind')!r})")
    try:
        return VisionConfig.from_json_dict(d[VISION_KIND], source=f"{path}: {VISION_KIND}")
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"{path}: {VISION_KIND}: {e}") from e


def load_mm_vision(mm_path: str | Path, shardings: Any = None) -> tuple[VisionConfig, dict[str, Any]]:
    """`(VisionConfig, params)` of an mm vision checkpoint (numpy, or jax arrays placed by `shardings`, one
    `Sharding` for all params)."""
    from mm.convert import mm_dir as mmd

    config = read_mm_vision_config(mm_path)
    name_map = vision_name_map(config)
    stored = mmd.params_metadata(mm_path)
    mmd.check_params(stored, name_map, str(Path(mm_path) / mmd.PARAMS_DIR))
    paths = list(name_map.expected_mm_paths())
    dtype = np.dtype(config.param_dtype)
    per_path = None if shardings is None else {p: shardings for p in paths}
    params = mmd.load_param_paths(mm_path, paths, {p: dtype for p in paths}, {p: stored[p][0] for p in paths},
                                  per_path)
    return config, params
