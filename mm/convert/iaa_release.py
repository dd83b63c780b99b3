"""The original IAA release's checkpoint layout (DESIGN.md section 2) <-> mm's IAA params.

Release layout: an HF Llama `config.json` with `"model_type": "IAA"` plus LLaVA-style `mm_*` fields, and
safetensors (sharded with an index) holding the base under HF Llama names and each branch under its own:

    branch  embedding                               layers                           norm                             head                         projector
    mm      model.embed_tokens_condition            model.condition_layers.{k}       model.norm_condition             lm_head_condtion (sic)       model.mm_projector.{0,2}
    g       model.embed_tokens_condition_grounding  model.condition_layers_grounding model.norm_condition_grounding   lm_head_condtion_grounding   model.mm_projector_G.{0,2}

Insertion positions are not stored by the release (its code hard-codes IAA-14); import takes them as an
option and defaults to IAA-14 when 14 condition layers are present. The release's vision tower may be
present under `model.vision_tower.vision_tower.vision_model.*` (or, re-saved by transformers >= 5.24, without
`vision_model.`; `hf_vision.detect_vision_prefix` accepts both); the reference loader ignores it and reloads
CLIP from `mm_vision_tower`, so import reports which source the caller should use (`VisionSource`).

Two exports: `export_release` (one directory in the release layout, for the original PyTorch inference code)
and `export_base_and_adapter` (the base as an ordinary HF checkpoint plus the branches beside it, so one base
model can serve any number of plug-ins).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mm.config import ConfigError, LLMConfig, read_json
from mm.convert import mm_dir as mmd
from mm.convert.errors import ConversionError
from mm.convert.hf_vision import RELEASE_TOWER_CONTAINER, TOWER_MODULE, detect_vision_prefix
from mm.convert.llm_map import llm_entries, llm_ignorable
from mm.convert.name_map import IDENTITY, TRANSPOSE, Entry, NameMap
from mm.convert.pipeline import open_hf_checkpoint, read_params, staged_output
from mm.convert.export import write_hf_tensors
from mm.models.connectors import ProjectorConfig
from mm.models.iaa import IAA_14, BranchConfig, IAAConfig

RELEASE_MODEL_TYPE = "IAA"
RELEASE_VISION_PREFIX = RELEASE_TOWER_CONTAINER + TOWER_MODULE  # the release's own naming of its tower
ADAPTER_CONFIG = "iaa_adapter_config.json"
ADAPTER_WEIGHTS = "iaa_adapter.safetensors"
BRANCH_NAMES = {
    "mm": dict(embed="model.embed_tokens_condition", layers="model.condition_layers", norm="model.norm_condition",
               head="lm_head_condtion", projector="model.mm_projector"),
    "g": dict(embed="model.embed_tokens_condition_grounding", layers="model.condition_layers_grounding",
              norm="model.norm_condition_grounding", head="lm_head_condtion_grounding",
              projector="model.mm_projector_G"),
}


@dataclasses.dataclass(frozen=True)
class VisionSource:
    """Where the vision tower comes from: tensors inside the checkpoint, or `mm_vision_tower`."""

    in_checkpoint: bool
    mm_vision_tower: str | None
    select_layer: int
    select_feature: str


# ------------------------------------------------------------------------------------------ name map
def branch_entries(llm: LLMConfig, branch: BranchConfig) -> list[Entry]:
    """One branch's entries: the LLM table for `len(positions)` layers, renamed to the release's names."""
    if branch.name not in BRANCH_NAMES:
        raise ConversionError(f"the IAA release layout has branches {sorted(BRANCH_NAMES)}, not {branch.name!r}")
    names = BRANCH_NAMES[branch.name]
    renames = ((r"^model\.embed_tokens\.", names["embed"] + "."), (r"^model\.layers\.", names["layers"] + "."),
               (r"^model\.norm\.", names["norm"] + "."), (r"^lm_head\.", names["head"] + "."))
    out = []
    for e in llm_entries(llm.replace(num_layers=len(branch.positions)), mm_prefix=(branch.name,)):
        hf = e.hf_name
        for pat, rep in renames:
            hf = re.sub(pat, rep, hf)
        out.append(dataclasses.replace(e, hf_name=hf))
    p = branch.projector
    for k in range(p.depth):  # torch Sequential(Linear, GELU, Linear, ...): Linear k sits at index 2k
        in_dim = p.in_dim if k == 0 else p.out_dim
        path = (branch.name, "projector", f"linear_{k}")
        out.append(Entry(f"{names['projector']}.{2 * k}.weight", (p.out_dim, in_dim), path + ("kernel",), TRANSPOSE))
        out.append(Entry(f"{names['projector']}.{2 * k}.bias", (p.out_dim,), path + ("bias",), IDENTITY))
    return out


def release_name_map(config: IAAConfig, with_base: bool = True) -> NameMap:
    entries = llm_entries(config.llm, mm_prefix=("base",)) if with_base else []
    for b in config.branches:
        entries += branch_entries(config.llm, b)
    ignorable = llm_ignorable(config.llm) + [re.escape(RELEASE_TOWER_CONTAINER) + ".*"]  # the tower, either naming
    return NameMap(entries, ignorable)


# ------------------------------------------------------------------------------------------- config
def _projector_config(d: Mapping[str, Any], llm: LLMConfig, source: str) -> ProjectorConfig:
    kind = d.get("mm_projector_type", "linear")
    if "mm_hidden_size" not in d:
        raise ConversionError(f"{source}: missing key 'mm_hidden_size'")
    try:
        return ProjectorConfig(kind=kind, in_dim=int(d["mm_hidden_size"]), out_dim=llm.hidden_size)
    except ConfigError as e:
        raise ConversionError(f"{source}: mm_projector_type: {e}") from e


def read_release_config(src: str | Path, tensor_names: Sequence[str],
                        positions: Sequence[int] | None = None) -> tuple[IAAConfig, VisionSource]:
    """The IAAConfig of a release directory; branches are the ones whose tensors are present."""
    path = Path(src) / "config.json"
    d = read_json(path)
    if d.get("model_type") != RELEASE_MODEL_TYPE:
        raise ConversionError(f"{path}: model_type={d.get('model_type')!r}, expected {RELEASE_MODEL_TYPE!r}")
    try:
        llm = LLMConfig.from_hf_dict({**d, "model_type": "llama"}, source=str(path))
    except (ConfigError, KeyError) as e:
        raise ConversionError(f"{path}: {e}") from e
    proj = _projector_config(d, llm, str(path))
    branches = []
    for name, names in BRANCH_NAMES.items():
        pat = re.compile(re.escape(names["layers"]) + r"\.(\d+)\.")
        layer_ids = {int(m.group(1)) for n in tensor_names if (m := pat.match(n))}
        if not layer_ids:
            continue
        n = max(layer_ids) + 1
        pos = tuple(positions) if positions is not None else (IAA_14 if n == len(IAA_14) else None)
        if pos is None:
            raise ConversionError(f"{src}: branch {name!r} has {n} condition layers; the release does not store "
                                  "their positions - pass positions= (IAA-14 is assumed only for 14 layers)")
        if len(pos) != n:
            raise ConversionError(f"{src}: branch {name!r} has {n} condition layers but {len(pos)} positions")
        branches.append(BranchConfig(name, pos, proj))
    if not branches:
        raise ConversionError(f"{src}: no IAA branch tensors (expected e.g. model.condition_layers.0.*)")
    try:
        config = IAAConfig(llm=llm, branches=tuple(branches))
    except ConfigError as e:
        raise ConversionError(f"{src}: {e}") from e
    vision = VisionSource(
        in_checkpoint=any(n.startswith(RELEASE_TOWER_CONTAINER) for n in tensor_names),
        mm_vision_tower=d.get("mm_vision_tower"), select_layer=int(d.get("mm_vision_select_layer", -2)),
        select_feature=str(d.get("mm_vision_select_feature", "patch")))
    return config, vision


def release_hf_config(config: IAAConfig, vision_tower: str, select_layer: int = -2,
                      select_feature: str = "patch", torch_dtype: str = "float32") -> dict[str, Any]:
    """The release's config.json: the base's HF Llama config plus `model_type: IAA` and the `mm_*` fields."""
    projs = {b.projector for b in config.branches}
    if len(projs) != 1:
        raise ConversionError("the release layout has one projector config for all branches; these differ")
    proj = projs.pop()
    d = config.llm.to_hf_dict(torch_dtype=torch_dtype)
    d.update(model_type=RELEASE_MODEL_TYPE, architectures=["IAAForCausalLM"], mm_vision_tower=vision_tower,
             mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature,
             mm_projector_type=proj.kind, mm_hidden_size=proj.in_dim, mm_use_im_start_end=False,
             mm_use_im_patch_token=False)
    return d


# ------------------------------------------------------------------------------------------- import
def load_release(src: str | Path, positions: Sequence[int] | None = None,
                 param_dtype: str = "float32") -> tuple[IAAConfig, dict[str, Any], VisionSource]:
    """Reads a release directory into mm IAA params `{"base": ..., "mm": ..., "g": ...}` (numpy)."""
    from mm.convert.safetensors_io import SafetensorsCheckpoint

    src = Path(src)
    with SafetensorsCheckpoint(src) as probe:
        names = list(probe.tensors)
    config, vision = read_release_config(src, names, positions)
    config = dataclasses.replace(config, llm=config.llm.replace(param_dtype=param_dtype))
    name_map = release_name_map(config)
    with open_hf_checkpoint(src, name_map) as ckpt:
        return config, read_params(ckpt, name_map, param_dtype), vision


# ------------------------------------------------------------------------------------------- export
def export_release(config: IAAConfig, params: Mapping[str, Any], dst: str | Path, *, vision_tower: str | None = None,
                   dtype: str | None = None, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                   tokenizer_dir: str | Path | None = None, vision: tuple[Any, Any] | None = None) -> Path:
    """Writes `params` in the release layout (config.json + safetensors [+ index] + tokenizer files).

    `vision=(VisionConfig, tower params)` also writes the tower as an HF directory `dst/vision_tower/` and
    points `mm_vision_tower` at it (absolute path), which is where the reference loader reads CLIP from;
    otherwise `vision_tower` (e.g. a hub id) is recorded as given.
    """
    name_map = release_name_map(config)
    if vision is None and vision_tower is None:
        raise ConversionError("export_release needs vision_tower= (a path or hub id) or vision=(config, params)")
    if vision is not None:
        vision_tower = str(Path(dst).absolute() / "vision_tower")
    with staged_output(dst, overwrite) as stage:
        if vision is not None:
            from mm.convert.hf_vision import vision_name_map

            vcfg, vparams = vision
            (stage / "vision_tower").mkdir()
            (stage / "vision_tower" / "config.json").write_text(json.dumps(vcfg.to_hf_dict(), indent=2))
            write_hf_tensors(stage / "vision_tower", vision_name_map(vcfg), vparams, dtype, max_shard_bytes)
        torch_dtype = str(np.dtype(dtype or np.asarray(params["base"]["norm"]["scale"]).dtype))
        (stage / "config.json").write_text(json.dumps(release_hf_config(config, vision_tower,
                                                                         torch_dtype=torch_dtype), indent=2))
        if tokenizer_dir is not None:
            mmd.copy_files(Path(tokenizer_dir), stage, mmd.TOKENIZER_FILES)
        write_hf_tensors(stage, name_map, params, dtype, max_shard_bytes)
    return Path(dst)


def export_base_and_adapter(config: IAAConfig, params: Mapping[str, Any], dst: str | Path, *,
                            vision_tower: str, dtype: str | None = None, overwrite: bool = False) -> Path:
    """`dst/base/`: the frozen LLM as a plain HF checkpoint (transformers loads it as is);
    `dst/adapter/`: the branches in release names plus `iaa_adapter_config.json` (positions, projector)."""
    from mm.convert.llm_map import llm_name_map

    with staged_output(dst, overwrite) as stage:
        base = stage / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(config.llm.to_hf_dict(
            torch_dtype=str(np.dtype(dtype or np.asarray(params["base"]["norm"]["scale"]).dtype))), indent=2))
        write_hf_tensors(base, llm_name_map(config.llm), params["base"], dtype, 5 * 10**9)
        adapter = stage / "adapter"
        adapter.mkdir()
        meta = release_hf_config(config, vision_tower)
        meta["iaa_branches"] = {b.name: {"positions": list(b.positions)} for b in config.branches}
        meta["base_model"] = "../base"
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
        branch_params = {b.name: params[b.name] for b in config.branches}
        write_hf_tensors(adapter, release_name_map(config, with_base=False), branch_params, dtype, 10**15,
                       file_names=[ADAPTER_WEIGHTS])
    return Path(dst)


def load_base_and_adapter(src: str | Path, param_dtype: str = "float32") -> tuple[IAAConfig, dict[str, Any]]:
    """Reads what `export_base_and_adapter` wrote (the base may be any HF Llama directory)."""
    from mm.convert.pipeline import load_hf_llm

    src = Path(src)
    meta = read_json(src / "adapter" / ADAPTER_CONFIG)
    base_dir = (src / "adapter" / meta.get("base_model", "../base")).resolve()
    llm, base = load_hf_llm(base_dir, param_dtype=param_dtype)
    proj = _projector_config(meta, llm, str(src / "adapter" / ADAPTER_CONFIG))
    branches = tuple(BranchConfig(n, tuple(v["positions"]), proj) for n, v in meta["iaa_branches"].items())
    config = IAAConfig(llm=llm, branches=branches)
    name_map = release_name_map(config, with_base=False)
    with open_hf_checkpoint(src / "adapter", name_map) as ckpt:
        return config, {"base": base, **read_params(ckpt, name_map, param_dtype)}


# --------------------------------------------------------------------------------- with the tower
def _infer_clip_config(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> Any:
    """A CLIP VisionConfig from tensor shapes alone. Heads are not recoverable from shapes: CLIP ViTs use
    64-dim heads (ViT-B/L), which is assumed and reported."""
    from mm.config import VisionConfig

    hidden, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    n_pos = shapes[prefix + "embeddings.position_embedding.weight"][0]
    grid = int(round((n_pos - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n)))
    inter = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    return VisionConfig(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=inter,
                        num_layers=layers, num_heads=max(1, hidden // 64), image_size=grid * patch, patch_size=patch,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)


def load_release_vlm(src: str | Path, *, vision: str | Path | None = None, positions: Sequence[int] | None = None,
                     param_dtype: str = "float32") -> tuple[Any, dict[str, Any], str]:
    """A release directory as a full VLM: `(VLMConfig, params, which vision tower was used)`.

    The tower comes from, in order: `vision` (a local HF CLIP/SigLIP directory); `mm_vision_tower` when it is
    a local directory (what the reference loader does); the checkpoint's own
    `model.vision_tower.vision_tower.[vision_model.]*` tensors (config inferred from their shapes). Nothing is
    downloaded: a hub id with no tensors in the checkpoint is an error that says what to pass.
    """
    from mm.convert.hf_vision import load_hf_vision, vision_name_map
    from mm.convert.safetensors_io import SafetensorsCheckpoint
    from mm.models.vlm import VLMConfig

    config, params, vs = load_release(src, positions, param_dtype)
    tower_dir = Path(vision) if vision is not None else (
        Path(vs.mm_vision_tower) if vs.mm_vision_tower and Path(vs.mm_vision_tower).is_dir() else None)
    if tower_dir is not None:
        vcfg, vparams = load_hf_vision(tower_dir, param_dtype=param_dtype)
        used = f"vision tower from {tower_dir}" + (" (mm_vision_tower)" if vision is None else "")
    elif vs.in_checkpoint:
        with SafetensorsCheckpoint(src) as probe:
            prefix = detect_vision_prefix(probe.tensors, str(src), containers=(RELEASE_TOWER_CONTAINER,))
            shapes = {n: t.shape for n, t in probe.tensors.items() if n.startswith(prefix)}
        vcfg = _infer_clip_config(shapes, prefix).replace(param_dtype=param_dtype)
        tower_map = vision_name_map(vcfg, prefix, owned=RELEASE_TOWER_CONTAINER)  # all under it is the tower's
        with open_hf_checkpoint(src, tower_map) as ckpt:
            vparams = read_params(ckpt, tower_map, param_dtype)
        used = (f"vision tower from the checkpoint's {prefix}* tensors (config inferred from "
                f"shapes, {vcfg.num_heads} heads of 64 assumed)")
    else:
        raise ConversionError(f"{src}: mm_vision_tower={vs.mm_vision_tower!r} is not a local directory and the "
                              "checkpoint holds no vision tower tensors; pass vision=<local HF CLIP directory>")
    vlm = VLMConfig(vision=vcfg, lm=config, feature_layer=vs.select_layer, feature=vs.select_feature,
                    image_token_id=-200)
    return vlm, {"vision": vparams, **params}, used
