"""The training config schema: every key a run may set, with its type, and the checks run before anything heavy.

Stage configs (`configs/*.py`) start from `base_config()` and change values; `validate` rejects keys that are
not in the schema, values of the wrong type, mesh shapes the devices cannot form and checkpoint paths that do
not exist - each error names the key (`optim.lr`, `init.checkpoint`, ...), so a typo costs seconds, not a
compiled step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Collection, Mapping

import ml_collections

from mm import paths
from mm.config import ConfigError, LLMConfig, unknown_key_error

MODEL_KINDS = ("llm", "llava", "iaa", "vlm")  # vlm: ViT in the graph (POINTS-style per-layer ViT training)
# llava_json: the Grain pipeline of mm.data; preference: the same on rows with `chosen` / `rejected` answers (DPO)
DATA_KINDS = ("synthetic_text", "synthetic_mm", "llava_json", "preference")
GRAIN_KINDS = ("llava_json", "preference")


def _llm_defaults() -> dict[str, Any]:
    """A tiny Llama: the default so tests and smoke runs need no checkpoint."""
    d = dataclasses.asdict(LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                                     num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                                     bos_token_id=1, eos_token_id=(2,), pad_token_id=0))
    d["eos_token_id"] = list(d["eos_token_id"])
    d["rope_scaling"] = None
    return d


def _vision_defaults() -> dict[str, Any]:
    """A tiny CLIP ViT: 28x28 images, 14x14 patches -> 4 patch tokens."""
    from mm.config import VisionConfig

    return dataclasses.asdict(VisionConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                                           image_size=28, patch_size=14))


def _section(section: Any, cls: type, key: str) -> dict[str, Any]:
    """A config section as a dict, every key a field of the dataclass `cls` (else ConfigError naming it)."""
    d = dict(_as_dict(section))
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise unknown_key_error(f"{key}.{unknown[0]}", key, unknown[0], fields)
    return d


def vision_config_from(cfg: Any) -> Any:
    from mm.config import VisionConfig

    d = _section(cfg.model.vision, VisionConfig, "model.vision")
    try:
        return VisionConfig(**d)
    except ConfigError as e:
        raise ConfigError(f"model.vision: {e}") from e


def base_config() -> ml_collections.ConfigDict:
    """All keys with defaults; `check_schema` holds each value to its default's type (a `None` default takes any
    value; `model.llm`, `model.vision` and `rules` also take keys not listed here)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.model = ml_collections.ConfigDict(dict(
        kind="llm",
        llm=_llm_defaults(),
        # multimodal models: width of the (precomputed, frozen) vision features and the projector kind
        vision_width=32,
        projector="mlp2x_gelu",
        iaa_positions=(0, 1),
        iaa_branches=("mm",),
        iaa_workflow="mm",  # the branch this stage trains
        # kind "vlm": the ViT runs inside the step (features from `vision_select_layer`, class token dropped)
        vision=_vision_defaults(),
        vision_select_layer=-2,
        # POINTS (DESIGN.md section 4; kind "vlm"): a second, OCR ViT of model.vision's architecture (`ocr_vision/`)
        # merged after the shared projector as w * general + (1 - w) * ocr with w = ocr_weight; pixel_shuffle:
        # each tile's patch grid 2x2-stacked on channels (a quarter of the image positions, 4x the width)
        ocr_tower=False,
        ocr_weight=0.5,
        pixel_shuffle=False,
    ))
    c.init = ml_collections.ConfigDict(dict(
        seed=0,
        # PRNG for initialising weights: threefry2x32 (sharding-invariant) or rbg / unsafe_rbg (much faster
        # to compile on CPU; tests use it)
        prng_impl="threefry2x32",
        llm_checkpoint="",  # HF dir (config.json + safetensors) or mm dir for the base LLM; "" = random init
        checkpoint="",  # a previous stage's workdir or mm checkpoint dir to start from; "" = none
        # HF CLIP / SigLIP dir or mm "vision" dir for the ViT run in the step (data.kind llava_json, or
        # model.kind vlm); "" = seeded random init. Its shapes must equal model.vision's.
        vision_checkpoint="",
        # HF CLIP / SigLIP dir or mm "vision" dir for the OCR ViT (`ocr_vision/`, model.ocr_tower); "" = random, or
        # what the stages before init.checkpoint trained (configs/points.py: pretrain inherits ocr_vit's tower)
        ocr_vision_checkpoint="",
        # [[from, to], ...]: init.checkpoint's trained params under subtree `from` start this model's `to`
        # (configs/points.py: the ocr_vit stage's one tower `vision` is the OCR tower `ocr_vision` of pretrain)
        checkpoint_renames=(),
        # an HF PEFT LoRA adapter dir the run's adapters start from (model.kind llm; param_groups' LoRA rules
        # must ask for the same modules and ranks); "" = PEFT's fresh start (B = 0)
        lora_checkpoint="",
    ))
    # Ordered (regex over '/'-joined param paths, lr multiplier | "frozen" | {"lora": {rank, alpha, rslora,
    # dropout, lr_mult}}); first match wins (mm/train/param_groups.py).
    c.param_groups = ((".*", 1.0),)
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_frac=0.03, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        clip_norm=1.0, grad_accum=1,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=100, batch_size=8, seq_len=64, log_every=10, eval_every=0, eval_batches=2,
        eval_samples=2, eval_max_new_tokens=16,  # greedy samples per workflow at each eval (data.kind llava_json)
        max_consecutive_nonfinite=5,
        # > 0: the training and eval loss of every model kind and workflow applies the LM head and cross-entropy
        # this many tokens at a time (mm.losses.chunked_cross_entropy: no [tokens, vocab] logits); DPO's completion
        # log-probs (and the precomputed reference's) are always chunked, this many tokens a chunk, 512 when 0
        loss_chunk=0,
    ))
    c.data = ml_collections.ConfigDict(dict(
        kind="synthetic_text", seed=1234, eval_seed=4321, num_image_tokens=4, nan_at_steps=(),
        # kind "llava_json" (mm.data.pipeline): LLaVA JSON/JSONL file or ArrayRecord dir, image root, tokenizer
        # dir (AutoTokenizer), template "chat" | "plain", first-fit packing into train.seq_len, Grain workers.
        # Tiles are model.vision.image_size square; each tile gives (image_size / patch_size)^2 positions.
        path="", image_root="", tokenizer="", template="chat", pack=True, workers=0, read_threads=2,
        tiling="square", max_tiles=4, max_tiles_per_row=4, max_skip_fraction=0.5,
        eval_path="",  # held-out rows for eval losses ("" = data.path with data.eval_seed's order)
    ))
    # data.kind "preference": the DPO-family loss (mm.dpo_losses, TRL 1.13's names); reference "" = the run's
    # starting weights, else an HF / mm LLM dir of model.llm's shape for the base LLM (mm.train.preference);
    # precompute_reference: the reference's log-probs in one pass over the data before step 1, kept in
    # WORKDIR/reference_logps/ (TRL's precompute_ref_log_probs): no reference params or forward in the step
    c.dpo = ml_collections.ConfigDict(dict(loss_type=["sigmoid"], loss_weights=[], beta=0.1, label_smoothing=0.0,
                                           reference="", precompute_reference=False))
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, use_async=True))
    # axis sizes (-1: the rest); dcn_axis: on several TPU slices the axis that spans them over the data-centre
    # network (data parallel by default), every other axis stays inside a slice (mm.sharding.make_mesh)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_axis="data"))
    c.rules = ml_collections.ConfigDict(dict())  # logical axis overrides, e.g. {"embed": None}
    # steps=(a, b): trace steps a+1..b on every process (+ device memory profiles unless memory=False);
    # dump_hlo: the step's HLO into WORKDIR/hlo; server_port: a live profiler server (mm.profiling.capture)
    c.profile = ml_collections.ConfigDict(dict(steps=(), memory=True, dump_hlo=False, server_port=0))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, jsonl=True))
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    return c


# ----------------------------------------------------------------------------------------- validation
_TYPES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list"}


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):  # a default of one scalar type types the elements too: (0, 1)
        return isinstance(value, (list, tuple)) and (_element_type(default) is None or all(
            _type_ok(default[0], v) for v in value))
    return isinstance(value, type(default))


def _element_type(default: list | tuple) -> type | None:
    types = {type(v) for v in default}
    return types.pop() if len(types) == 1 and types <= {bool, int, float, str} else None


def _type_name(default: Any) -> str:
    if isinstance(default, (list, tuple)):
        return f"list of {_element_type(default).__name__}" if _element_type(default) else "list"
    return type(default).__name__


def _check_tree(schema: Mapping[str, Any], value: Mapping[str, Any], prefix: str, open_keys: tuple[str, ...]) -> None:
    for key in value:
        full = f"{prefix}{key}"
        if key not in schema and prefix.rstrip(".") not in open_keys:
            raise unknown_key_error(full, prefix.rstrip("."), key, schema)
        default, got = schema.get(key), value[key]
        if isinstance(default, Mapping) and not isinstance(got, Mapping):
            raise ConfigError(f"config key {full!r} must be a section, got {got!r}")
        if isinstance(default, Mapping):
            _check_tree(default, got, full + ".", open_keys)
        elif key in schema and not _type_ok(default, got):
            raise ConfigError(f"config key {full!r} = {got!r}: expected {_type_name(default)}")


def _as_dict(cfg: Any) -> Any:
    return cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg


def llm_config_from(cfg: Any) -> LLMConfig:
    """LLMConfig from the `model.llm` section (unknown fields name the key)."""
    d = _section(cfg.model.llm, LLMConfig, "model.llm")
    if d.get("eos_token_id") is not None:
        d["eos_token_id"] = tuple(d["eos_token_id"])
    if d.get("rope_scaling"):
        from mm.config import RopeScaling
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    try:
        return LLMConfig(**d)
    except ConfigError as e:
        raise ConfigError(f"model.llm: {e}") from e


def _check_groups(groups: Any) -> None:
    import re

    from mm.train.param_groups import lora_spec

    if not isinstance(groups, (list, tuple)) or not groups:
        raise ConfigError("config key 'param_groups' must be a non-empty list of (regex, lr_mult | 'frozen')")
    for i, g in enumerate(groups):
        if not isinstance(g, (list, tuple)) or len(g) != 2:
            raise ConfigError(f"config key param_groups[{i}] = {g!r}: expected (regex, lr_mult | 'frozen')")
        pattern, value = g
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config key param_groups[{i}]: bad regex {pattern!r} ({e})") from e
        if lora_spec(value, f"param_groups[{i}]") is not None:
            continue
        if value != "frozen" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"config key param_groups[{i}] value {value!r}: a multiplier >= 0, 'frozen' or "
                              "{'lora': {...}}")


def check_schema(cfg: Any) -> None:
    """The first check of `validate`: every key is in `base_config()` and has its type (ConfigError naming it)."""
    _check_tree(base_config().to_dict(), _as_dict(cfg), "", open_keys=("model.llm", "model.vision", "rules"))


def mesh_axes(cfg: Any) -> dict[str, int]:
    """The mesh section's axis sizes (without `dcn_axis`)."""
    from mm.sharding import MESH_AXES

    return {a: int(cfg.mesh[a]) for a in MESH_AXES}


def dcn_axis(cfg: Any) -> str:
    """The mesh axis that spans TPU slices (`mesh.dcn_axis`; "data" in a config.json from before the key)."""
    return str(cfg.mesh.get("dcn_axis", "data"))


def named_paths(cfg: Any) -> list[str]:
    """Every checkpoint / data path the config names (an ahead-of-time compile reads none of them)."""
    keys = [("data", k) for k in ("path", "eval_path", "image_root", "tokenizer")]
    keys += [("init", k) for k in ("llm_checkpoint", "checkpoint", "vision_checkpoint", "ocr_vision_checkpoint",
                                   "lora_checkpoint")]
    keys += [("dpo", "reference")]
    return [str(cfg[a][b]) for a, b in keys if b in cfg[a] and cfg[a][b]]


def validate(cfg: Any, n_devices: int | None = None, *, pending_paths: Collection[str] = (),
             compile_only: bool = False) -> None:
    """Raises ConfigError naming the key for anything wrong; cheap (no model is built). Paths in
    `pending_paths` are made by an earlier stage of a pipeline, so their existence is not checked yet.
    `compile_only` (an ahead-of-time compile, which reads no checkpoint or data): no path need be set or exist."""
    check_schema(cfg)
    if compile_only:
        pending_paths = named_paths(cfg)
    m, t, o = cfg.model, cfg.train, cfg.optim
    if cfg.init.prng_impl not in ("threefry2x32", "rbg", "unsafe_rbg"):
        raise ConfigError(f"config key init.prng_impl = {cfg.init.prng_impl!r}: threefry2x32, rbg or unsafe_rbg")
    if m.kind not in MODEL_KINDS:
        raise ConfigError(f"config key model.kind = {m.kind!r}: choose one of {MODEL_KINDS}")
    if cfg.data.kind not in DATA_KINDS:
        raise ConfigError(f"config key data.kind = {cfg.data.kind!r}: choose one of {DATA_KINDS}")
    llm_config_from(cfg)
    if cfg.data.kind in GRAIN_KINDS:
        _check_llava_json(cfg, pending_paths, need_paths=not compile_only)
    _check_dpo(cfg, pending_paths)
    if m.kind == "vlm":
        vision_config_from(cfg)
    for key in ("steps", "batch_size", "seq_len", "log_every"):
        if t[key] <= 0:
            raise ConfigError(f"config key train.{key} = {t[key]} must be positive")
    if o.grad_accum <= 0 or t.batch_size % o.grad_accum:
        raise ConfigError(f"config key optim.grad_accum = {o.grad_accum} must divide train.batch_size = {t.batch_size}")
    if not 0 <= o.warmup_frac < 1:
        raise ConfigError(f"config key optim.warmup_frac = {o.warmup_frac} must be in [0, 1)")
    if o.lr <= 0:
        raise ConfigError(f"config key optim.lr = {o.lr} must be positive")
    _check_groups(cfg.param_groups)
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep <= 0:
        raise ConfigError("config keys checkpoint.every must be >= 0 and checkpoint.keep > 0")
    steps = list(cfg.profile.steps)
    if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
        raise ConfigError(f"config key profile.steps = {steps}: expected [first, last) with first < last")
    if not 0 <= int(cfg.profile.server_port) < 65536:
        raise ConfigError(f"config key profile.server_port = {cfg.profile.server_port}: a TCP port (0: no server)")
    if cfg.init.vision_checkpoint and not has_tower(cfg):
        raise ConfigError(f"config key init.vision_checkpoint = {cfg.init.vision_checkpoint!r}: this run has no ViT "
                          "in the step (needs data.kind = 'llava_json' with model.kind llava / iaa, or model.kind vlm)")
    _check_points(cfg)
    for key in ("llm_checkpoint", "checkpoint", "vision_checkpoint", "ocr_vision_checkpoint", "lora_checkpoint"):
        path = cfg.init.get(key, "")
        if path and path not in pending_paths and not paths.as_path(path).exists():
            raise ConfigError(f"config key init.{key} = {path!r}: no such file or directory")
    if cfg.init.lora_checkpoint:
        from mm.train.param_groups import has_lora

        if not has_lora(cfg.param_groups):
            raise ConfigError(f"config key init.lora_checkpoint = {cfg.init.lora_checkpoint!r}: param_groups has no "
                              "LoRA rule to load it into")
        if m.kind != "llm":
            raise ConfigError(f"config key init.lora_checkpoint: PEFT adapters start model.kind llm runs (an HF "
                              f"causal LM's modules); this run is {m.kind!r}")
    if m.kind == "iaa":
        n = cfg.model.llm.num_layers
        bad = [p for p in m.iaa_positions if not 0 <= p < n]
        if bad:
            raise ConfigError(f"config key model.iaa_positions = {list(m.iaa_positions)}: {bad} not in [0, {n})")
        if m.iaa_workflow not in m.iaa_branches:
            raise ConfigError(f"config key model.iaa_workflow = {m.iaa_workflow!r} not in model.iaa_branches")
    from mm.sharding import MESH_AXES

    if dcn_axis(cfg) not in MESH_AXES:
        raise ConfigError(f"config key mesh.dcn_axis = {dcn_axis(cfg)!r}: one of {list(MESH_AXES)}")
    if n_devices is not None:
        from mm.sharding import mesh_shape_from_config

        try:
            dims = mesh_shape_from_config(mesh_axes(cfg), n_devices)
        except ValueError as e:
            raise ConfigError(f"config key mesh: {e}") from e
        data_par = dims[0] * dims[1]
        micro = t.batch_size // o.grad_accum
        if micro % data_par:
            raise ConfigError(f"config key train.batch_size = {t.batch_size} (/ optim.grad_accum = {o.grad_accum}) "
                              f"does not split over {data_par} data-parallel devices (mesh {mesh_axes(cfg)})")
        tensor = dims[2]
        llm = cfg.model.llm
        for key in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if llm[key] % tensor:
                raise ConfigError(f"config key model.llm.{key} = {llm[key]} is not divisible by mesh.tensor = {tensor}")
        if llm["hidden_size"] % dims[1]:
            raise ConfigError(f"config key model.llm.hidden_size = {llm['hidden_size']} is not divisible by "
                              f"mesh.fsdp = {dims[1]}")
    if math.isnan(o.lr):
        raise ConfigError("config key optim.lr is NaN")


def checkpoint_renames(cfg: Any) -> list[tuple[str, str]]:
    """`init.checkpoint_renames` as (from, to) subtree pairs (`.get`: config.json files from before the key)."""
    return [(str(a), str(b)) for a, b in cfg.init.get("checkpoint_renames", ())]


def _check_points(cfg: Any) -> None:
    """The POINTS keys: an OCR tower, its checkpoint and the merge weight need model.kind vlm; renames are pairs."""
    m, init = cfg.model, cfg.init  # .get: a config.json from before these keys has none of them
    ocr_tower, shuffle, w = m.get("ocr_tower", False), m.get("pixel_shuffle", False), m.get("ocr_weight", 0.5)
    if (ocr_tower or shuffle) and m.kind != "vlm":
        key = "ocr_tower" if ocr_tower else "pixel_shuffle"
        raise ConfigError(f"config key model.{key} = True needs model.kind = 'vlm' (the ViTs in the step), "
                          f"got {m.kind!r}")
    if init.get("ocr_vision_checkpoint") and not ocr_tower:
        raise ConfigError(f"config key init.ocr_vision_checkpoint = {init.ocr_vision_checkpoint!r}: model.ocr_tower "
                          "is False (no OCR ViT to load it into)")
    if not 0.0 <= float(w) <= 1.0:
        raise ConfigError(f"config key model.ocr_weight = {w}: w in w * general + (1 - w) * ocr, in [0, 1]")
    for i, pair in enumerate(init.get("checkpoint_renames", ())):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) and x for x in pair)):
            raise ConfigError(f"config key init.checkpoint_renames[{i}] = {pair!r}: expected [from, to] subtree names")


def positions_per_tile(cfg: Any) -> int:
    """Image positions one tile of `model.vision`'s size takes in a row: its patches (class token dropped), a
    quarter of them with `model.pixel_shuffle` (`mm.config.VLMConfig.tokens_per_image`)."""
    grid = int(cfg.model.vision.image_size) // int(cfg.model.vision.patch_size)
    return grid * grid // (4 if cfg.model.get("pixel_shuffle", False) else 1)


def has_tower(cfg: Any) -> bool:
    """Whether the step runs a ViT (`vision/` params): kind vlm, or llava / iaa on pixel data."""
    return cfg.model.kind == "vlm" or (cfg.model.kind in ("llava", "iaa") and cfg.data.kind in GRAIN_KINDS)


def _check_dpo(cfg: Any, pending_paths: Collection[str] = ()) -> None:
    """The `dpo` section: the options `mm.dpo_losses.DPOSettings` takes (its errors name the key)."""
    from mm.dpo_losses import DPOSettings

    d = cfg.dpo
    weights = list(d.loss_weights)
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
        raise ConfigError(f"config key dpo.loss_weights = {weights!r}: expected a list of numbers (or empty)")
    try:
        DPOSettings(loss_type=tuple(d.loss_type), loss_weights=tuple(weights) or None, beta=float(d.beta),
                    label_smoothing=float(d.label_smoothing))
    except ValueError as e:
        raise ConfigError(f"config key {e}") from e
    if d.reference and d.reference not in pending_paths and not paths.as_path(d.reference).exists():
        raise ConfigError(f"config key dpo.reference = {d.reference!r}: no such file or directory")


def _check_llava_json(cfg: Any, pending_paths: Collection[str] = (), need_paths: bool = True) -> None:
    d = cfg.data
    if cfg.model.kind not in ("vlm", "llava", "iaa", "llm"):
        raise ConfigError(f"config key data.kind = {d.kind!r} needs model.kind llm (text-only rows) or a "
                          f"multimodal one (vlm, llava, iaa); got {cfg.model.kind!r}")
    if cfg.model.kind != "llm":
        vision_config_from(cfg)  # the ViT (model.vision) runs on the pipeline's pixel tiles in the step
    for key in ("path", "tokenizer"):
        if need_paths and not d[key]:
            raise ConfigError(f"config key data.{key} must be set for data.kind = {d.kind!r}")
    for key in ("path", "image_root", "tokenizer", "eval_path"):
        if d[key] and d[key] not in pending_paths and not paths.as_path(d[key]).exists():
            raise ConfigError(f"config key data.{key} = {d[key]!r}: no such file or directory")
    if d.template not in ("chat", "plain"):
        raise ConfigError(f"config key data.template = {d.template!r}: 'chat' or 'plain'")
    if d.tiling not in ("square", "catty"):
        raise ConfigError(f"config key data.tiling = {d.tiling!r}: 'square' or 'catty'")
    if d.workers < 0 or d.max_tiles_per_row <= 0:
        raise ConfigError("config keys data.workers must be >= 0 and data.max_tiles_per_row > 0")


def to_json(cfg: Any) -> str:
    return json.dumps(_as_dict(cfg), indent=2, sort_keys=True, default=str)
