"""The original IAA release's checkpoint layout (DESIGN.md section 2) <-> mm's IAA params.

Release layout: an HF Llama `config.json` with `"model_type": "IAA"` plus LLaVA-style `mm_*` fields, and
safetensors (sharded with an index) holding the base under HF Llama names and each branch under its own:

    part       branch mm                       branch g
    embedding  model.embed_tokens_condition    model.embed_tokens_condition_grounding
    layers     model.condition_layers.{k}      model.condition_layers_grounding
    norm       model.norm_condition            model.norm_condition_grounding
    head       lm_head_condtion (sic)          lm_head_condtion_grounding
    projector  model.mm_projector.{0,2}        model.mm_projector_G.{0,2}

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


from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.engine import convert
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import IDENTITY, TRANSPOSE, Entry, NameMap
from mm.checkpoints.readers import ChainReader, Reader, SafetensorsReader, TreeReader
from mm.checkpoints.staging import staged_output
from mm.checkpoints.writers import SafetensorsWriter, TreeWriter
from mm.config import ConfigError, LLMConfig, VisionConfig, read_json
from mm.convert import hf_vision, llm_family
from mm.convert.family import Opened
from mm.convert.hf_vision import RELEASE_TOWER_CONTAINER, TOWER_MODULE, detect_vision_prefix
from mm.convert.llm_family import llm_entries, llm_ignorable
from mm.config import IAA_14, IMAGE_TOKEN_ID, BranchConfig, IAAConfig, ProjectorConfig

RELEASE_MODEL_TYPE = "IAA"
RELEASE_VISION_PREFIX = RELEASE_TOWER_CONTAINER + TOWER_MODULE  # the release's own naming of its tower
ADAPTER_CONFIG = "iaa_adapter_config.json"
ADAPTER_WEIGHTS = "iaa_adapter.safetensors"
TOWER_NAMESPACE = "vision_tower:"  # the names of a separate tower directory read beside the release
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
    """Reads a release directory's language side into mm IAA params `{"base": ..., "mm": ..., "g": ...}`
    (numpy; no vision tower: the registry's `load` gives the whole VLM)."""
    src = Path(src)
    with SafetensorsReader(src) as reader:
        config, vision = read_release_config(src, list(reader.tensors()), positions)
        config = dataclasses.replace(config, llm=config.llm.replace(param_dtype=param_dtype))
        params = convert(reader, release_name_map(config), TreeWriter(), dtype=param_dtype, progress=False)
    return config, params, vision


def _infer_clip_config(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> VisionConfig:
    """A CLIP VisionConfig from tensor shapes alone. Heads are not recoverable from shapes: CLIP ViTs use
    64-dim heads (ViT-B/L), which is assumed and reported."""
    hidden, _, patch, _ = shapes[prefix + "embeddings.patch_embedding.weight"]
    n_pos = shapes[prefix + "embeddings.position_embedding.weight"][0]
    grid = int(round((n_pos - 1) ** 0.5))
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := layer_re.match(n)))
    inter = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    return VisionConfig(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=inter,
                        num_layers=layers, num_heads=max(1, hidden // 64), image_size=grid * patch, patch_size=patch,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)


def open_hf(directory: Path, vision: str | Path | None = None, positions: Sequence[int] | None = None) -> Opened:
    """A release directory as a whole VLM (tower + IAA), read in one stream (a "vlm" model: the registry sets
    the family).

    The tower comes from, in order: `vision` (a local HF CLIP/SigLIP directory); `mm_vision_tower` when it is
    a local directory (what the reference loader does); the checkpoint's own
    `model.vision_tower.vision_tower.[vision_model.]*` tensors (config inferred from their shapes). Nothing is
    downloaded: a hub id with no tensors in the checkpoint is an error that says what to pass.
    """
    from mm.config import VLMConfig

    release = SafetensorsReader(directory)
    readers: list[Reader] = [release]
    try:
        config, vs = read_release_config(directory, list(release.tensors()), positions)
        tower_dir = Path(vision) if vision is not None else (
            Path(vs.mm_vision_tower) if vs.mm_vision_tower and Path(vs.mm_vision_tower).is_dir() else None)
        if tower_dir is not None:
            vcfg = hf_vision.read_hf_vision_config(tower_dir)
            tower = SafetensorsReader(tower_dir, namespace=TOWER_NAMESPACE)
            readers.append(tower)
            prefix = detect_vision_prefix([n[len(TOWER_NAMESPACE):] for n in tower.tensors()], str(tower_dir))
            tower_map = hf_vision.vision_name_map(vcfg, prefix, mm_prefix=("vision",), namespace=TOWER_NAMESPACE)
            used = f"vision tower from {tower_dir}" + (" (mm_vision_tower)" if vision is None else "")
        elif vs.in_checkpoint:
            prefix = detect_vision_prefix(release.tensors(), str(directory), containers=(RELEASE_TOWER_CONTAINER,))
            vcfg = _infer_clip_config({n: m.shape for n, m in release.tensors().items() if n.startswith(prefix)},
                                      prefix)
            # all under the container is the tower's
            tower_map = hf_vision.vision_name_map(vcfg, prefix, owned=RELEASE_TOWER_CONTAINER, mm_prefix=("vision",))
            used = (f"vision tower from the checkpoint's {prefix}* tensors (config inferred from "
                    f"shapes, {vcfg.num_heads} heads of 64 assumed)")
        else:
            raise ConversionError(f"{directory}: mm_vision_tower={vs.mm_vision_tower!r} is not a local directory and "
                                  "the checkpoint holds no vision tower tensors; pass vision=<local HF CLIP directory>")
    except BaseException:
        for r in readers:
            r.close()
        raise
    lm_map = release_name_map(config)
    if tower_dir is not None:  # its names are namespaced: its patterns touch only them; the release's container
        ignorable = lm_map.ignorable + tower_map.ignorable  # (a tower copy the reference loader ignores) is dropped
    else:  # the tower is the container's contents: anything else under it is unexpected
        ignorable = tuple(llm_ignorable(config.llm)) + tower_map.ignorable[:1]  # + its position_ids buffer
    name_map = NameMap(list(tower_map.entries) + list(lm_map.entries), ignorable)
    vlm = VLMConfig(vision=vcfg, lm=config, feature_layer=vs.select_layer, feature=vs.select_feature,
                    image_token_id=IMAGE_TOKEN_ID)
    return Opened(None, vlm, ChainReader(readers) if len(readers) > 1 else release, name_map, directory,
                  llm_family.tokenizer_dir_of(directory), used)


# ------------------------------------------------------------------------------------------- export
def write_release(config: IAAConfig, reader: Reader, stage: Path, dst: Path, *, dtype: str = "keep",
                  max_shard_bytes: int = 5 * 10**9, tokenizer_dir: Path | None = None, vision_tower: str | None = None,
                  vision_config: VisionConfig | None = None, progress: bool = False) -> None:
    """The release layout in `stage` (which becomes `dst`) from IAA params in `reader` (mm side: `base`,
    branches, and with `vision_config` the tower under `vision/`, written as the HF directory
    `dst/vision_tower/` that `mm_vision_tower` points at (absolute), which is where the reference loader reads
    CLIP from); otherwise `vision_tower` (e.g. a hub id) is recorded as given."""
    if vision_config is None and vision_tower is None:
        raise ConversionError("export_release needs vision_tower= (a path or hub id) or vision=(config, params)")
    if vision_config is not None:
        vision_tower = str(Path(dst).absolute() / "vision_tower")
        tower_dir = stage / "vision_tower"
        tower_dir.mkdir()
        tower_map = NameMap(hf_vision.vision_entries(vision_config, hf_vision.HF_EXPORT_PREFIX, ("vision",)),
                            ignorable_mm=[r"(?!vision/).*"])
        convert(reader, tower_map, SafetensorsWriter(tower_dir, max_shard_bytes), dtype=dtype, progress=progress,
                desc="mm-to-hf vision")
        (tower_dir / "config.json").write_text(json.dumps(vision_config.to_hf_dict(), indent=2))
    lm_map = release_name_map(config)
    lm_map = NameMap(lm_map.entries, lm_map.ignorable, ignorable_mm=[r"vision/.*"])
    writer = SafetensorsWriter(stage, max_shard_bytes)
    convert(reader, lm_map, writer, dtype=dtype, progress=progress, desc="mm-to-hf")
    torch_dtype = str(next(p.dtype for p in writer.plan if p.key == "model.norm.weight"))
    (stage / "config.json").write_text(json.dumps(release_hf_config(config, vision_tower, torch_dtype=torch_dtype),
                                                  indent=2))
    if tokenizer_dir is not None:
        mmd.copy_files(Path(tokenizer_dir), stage, mmd.TOKENIZER_FILES)


def export_release(config: IAAConfig, params: Mapping[str, Any], dst: str | Path, *, vision_tower: str | None = None,
                   dtype: str | None = None, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                   tokenizer_dir: str | Path | None = None, vision: tuple[Any, Any] | None = None) -> Path:
    """Writes in-memory `params` in the release layout (config.json + safetensors [+ index] + tokenizer files);
    `vision=(VisionConfig, tower params)` adds the tower (see `write_release`), otherwise `vision_tower` (e.g. a
    hub id) is recorded as given."""
    tree = dict(params) if vision is None else {**params, "vision": vision[1]}
    with staged_output(dst, overwrite) as stage:
        write_release(config, TreeReader(tree), stage, Path(dst), dtype=dtype or "keep",
                      max_shard_bytes=max_shard_bytes,
                      tokenizer_dir=None if tokenizer_dir is None else Path(tokenizer_dir), vision_tower=vision_tower,
                      vision_config=None if vision is None else vision[0])
    return Path(dst)


def export_base_and_adapter(config: IAAConfig, params: Mapping[str, Any], dst: str | Path, *,
                            vision_tower: str, dtype: str | None = None, overwrite: bool = False) -> Path:
    """`dst/base/`: the frozen LLM as a plain HF checkpoint (transformers loads it as is);
    `dst/adapter/`: the branches in release names plus `iaa_adapter_config.json` (positions, projector)."""
    with staged_output(dst, overwrite) as stage:
        base = stage / "base"
        base.mkdir()
        writer = SafetensorsWriter(base, 5 * 10**9)
        convert(TreeReader(params["base"]), llm_family.llm_name_map(config.llm), writer, dtype=dtype or "keep",
                progress=False)
        torch_dtype = str(next(p.dtype for p in writer.plan if p.key == "model.norm.weight"))
        (base / "config.json").write_text(json.dumps(config.llm.to_hf_dict(torch_dtype=torch_dtype), indent=2))
        adapter = stage / "adapter"
        adapter.mkdir()
        meta = release_hf_config(config, vision_tower)
        meta["iaa_branches"] = {b.name: {"positions": list(b.positions)} for b in config.branches}
        meta["base_model"] = "../base"
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
        branch_params = {b.name: params[b.name] for b in config.branches}
        convert(TreeReader(branch_params), release_name_map(config, with_base=False),
                SafetensorsWriter(adapter, 10**15, file_names=[ADAPTER_WEIGHTS]), dtype=dtype or "keep",
                progress=False)
    return Path(dst)


def load_base_and_adapter(src: str | Path, param_dtype: str = "float32") -> tuple[IAAConfig, dict[str, Any]]:
    """Reads what `export_base_and_adapter` wrote (the base may be any HF Llama directory)."""
    src = Path(src)
    meta = read_json(src / "adapter" / ADAPTER_CONFIG)
    base_dir = (src / "adapter" / meta.get("base_model", "../base")).resolve()
    with llm_family.open_hf(base_dir) as base_ckpt:
        llm = base_ckpt.config.replace(param_dtype=param_dtype)
        base = convert(base_ckpt.reader, base_ckpt.name_map, TreeWriter(), dtype=param_dtype, progress=False)
    proj = _projector_config(meta, llm, str(src / "adapter" / ADAPTER_CONFIG))
    branches = tuple(BranchConfig(n, tuple(v["positions"]), proj) for n, v in meta["iaa_branches"].items())
    config = IAAConfig(llm=llm, branches=branches)
    with SafetensorsReader(src / "adapter") as reader:
        branch_params = convert(reader, release_name_map(config, with_base=False), TreeWriter(), dtype=param_dtype,
                                progress=False)
    return config, {"base": base, **branch_params}
