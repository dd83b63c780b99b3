"""The params a run starts from, each from exactly one source, placed on its sharding as it is made.

Sources, later ones winning for the params they hold:
1. `init.llm_checkpoint` (HF Llama / Qwen2 dir, or an mm LLM dir) -> the base LLM (`model.base_prefix`);
2. `init.vision_checkpoint` (HF CLIP / SigLIP dir, or an mm vision dir) -> `vision/`; `init.ocr_vision_checkpoint`
   -> POINTS' OCR tower `ocr_vision/`;
3. `init.checkpoint` (a previous stage's workdir) -> the params that stage trained, named through
   `init.checkpoint_renames`; params it kept frozen come from the stage before it that trained them, and so on;
4. derived params (`TrainModel.derived`, IAA branches: MM-EL, insertion layers, norm, head) not filled by 3
   are copies of their source *as loaded above* - the real LLM, the previous stage's, or the seed's;
5. everything else is initialised randomly from `init.seed`; the init is one jitted function whose outputs
   are only those params, so XLA never computes (or allocates) the ones a checkpoint fills.
Checkpoints are read straight into sharded arrays (`mm.convert.registry.load`: regional safetensors reads for
HF dirs, Orbax's sharded restore for mm dirs): each host reads the regions its devices hold, one param at a time.

A previous stage also says where its frozen weights came from (`meta.frozen_source`): a run given
`init.checkpoint` but no `init.llm_checkpoint` / `init.vision_checkpoint` takes that stage's, so the base and
the branches copied from it are the ones the previous stage trained against.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mm import paths
from mm.config import ConfigError
from mm import lora_params
from mm.models import llm
from mm.train import schema as tcfg
from mm.train import models
from mm.train import param_groups as pg
from mm.train.checkpoint import Checkpointer, find_trained_params

VISION_SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                       "patch_size", "num_channels", "hidden_act", "use_head")
# what `initial_params` counts, and how the start-up log names each source
SOURCES = {"llm_checkpoint": "from init.llm_checkpoint", "vision_checkpoint": "from init.vision_checkpoint",
           "ocr_vision_checkpoint": "from init.ocr_vision_checkpoint",
           "previous_stage": "from init.checkpoint (and the stages before it)",
           "copied": "copied from the base (IAA branches)",
           "random": "random from init.seed", "lora": "LoRA adapters at PEFT's start (B = 0)",
           "lora_checkpoint": "LoRA adapters from init.lora_checkpoint"}
LLM_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "head_dim", "tie_word_embeddings", "attention_bias")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()


def _check_fields(got: Any, want: Any, fields: tuple[str, ...], source: str, section: str) -> None:
    for f in fields:
        if getattr(got, f) != getattr(want, f):
            raise ConfigError(f"{source}: {f}={getattr(got, f)!r} but {section}.{f}={getattr(want, f)!r}")


def _subtree(flat: Mapping[str, Any], prefix: str) -> dict[tuple[str, ...], Any]:
    """`prefix/`-rooted flat entries as mm-path tuples relative to `prefix`."""
    p = f"{prefix}/" if prefix else ""
    return {tuple(k[len(p):].split("/")): v for k, v in flat.items() if k.startswith(p)}


def _placed(loaded: Mapping[tuple[str, ...], Any], prefix: str, flat_sh: Mapping[str, Any], source: str
            ) -> dict[str, jax.Array]:
    """Loaded params (mm paths relative to `prefix`) as flat model paths; they must fill every model param under
    `prefix` (a missing one names `source`; one with no place in the model the readers already refused)."""
    p = f"{prefix}/" if prefix else ""
    out = {p + "/".join(k): v for k, v in loaded.items()}
    missing = sorted(k for k in flat_sh if k.startswith(p) and k not in out and not lora_params.is_adapter(k))
    if missing:
        raise ConfigError(f"{source}: missing params {missing[:5]}")
    return out


def _load_checkpoint(key: str, path: Path, handle: str, want: Any, fields: tuple[str, ...], section: str,
                     prefix: str, flat_sh: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The checkpoint of config key `key` (an HF or mm directory of a family served by `handle`, "llm" or
    "vision") straight onto the shardings under `prefix`, in `want.param_dtype`; its config must match `want`
    (`section`) on `fields`."""
    from mm.checkpoints.errors import ConversionError
    from mm.convert import registry

    source = f"{key}={path}"
    shardings = {k: v for k, v in _subtree(flat_sh, prefix).items() if not lora_params.is_adapter("/".join(k))}
    try:
        with registry.open_checkpoint(path) as opened:
            if opened.family.handle != handle:
                raise ConfigError(f"{source}: a {opened.family.name} checkpoint, not the {handle} this key takes")
            _check_fields(opened.config, want, fields, source, section)
            _, tree = registry.load(opened, dtype=want.param_dtype, shardings=shardings, progress=True)
    except ConversionError as e:
        raise ConfigError(f"{source}: {e}") from e
    return _placed(traverse_util.flatten_dict(tree), prefix, flat_sh, source)


def load_base_llm(path: str | Path, model: models.TrainModel, flat_sh: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flat base-LLM params from an HF dir or an mm dir, placed on their shardings (`model.base_prefix`)."""
    return _load_checkpoint("init.llm_checkpoint", paths.local_copy(path), "llm", model.llm_config,
                            LLM_SHAPE_FIELDS, "model.llm", model.base_prefix, flat_sh)


def load_vision(path: str | Path, cfg: Any, flat_sh: Mapping[str, Any], tower: str = "vision"
                ) -> dict[str, jax.Array]:
    """Flat `vision/...` (or POINTS' OCR tower, `tower="ocr_vision"`) params from an HF CLIP / SigLIP dir or an mm
    vision dir, placed on their shardings; its config must equal `model.vision` (both towers share it) on every
    field that shapes or computes the tower."""
    return _load_checkpoint(f"init.{tower}_checkpoint", paths.local_copy(path), "vision",
                            tcfg.vision_config_from(cfg), VISION_SHAPE_FIELDS, "model.vision", tower, flat_sh)


def _previous_stage(path: str) -> tuple[Path, int, dict[str, Any]]:
    found = find_trained_params(path)
    if found is None:
        raise ConfigError(f"init.checkpoint={path}: no finished training checkpoint found there")
    ckdir, step = found
    mgr = Checkpointer(ckdir.parent, keep=1000, use_async=False)
    try:
        meta = mgr.read_meta(step)
    finally:
        mgr.manager.close()
    return ckdir, step, meta


def _inherit_frozen_sources(cfg: Any, meta: Mapping[str, Any]) -> None:
    """`init.llm_checkpoint` / `init.vision_checkpoint` left empty in a run that starts from a previous stage
    take that stage's (its `meta.frozen_source`), so the frozen weights are the ones it trained against; the
    config is updated, so the run's own checkpoints record them too."""
    src = meta.get("frozen_source", {})
    for key in ("llm_checkpoint", "vision_checkpoint", "ocr_vision_checkpoint"):
        if not cfg.init.get(key) and src.get(key):
            cfg.init[key] = str(src[key])
            _log(f"init: {key} = {src[key]} (from the previous stage {cfg.init.checkpoint})")


def renamed(path: str, renames: Any) -> str:
    """`path` with its leading subtree renamed by the first matching (from, to) pair of `renames`."""
    for a, b in renames:
        if path == a or path.startswith(a + "/"):
            return b + path[len(a):]
    return path


def _restore_trained(ckdir: Path, step: int, meta: Mapping[str, Any], flat_sh: Mapping[str, Any],
                     flat_abstract: Mapping[str, Any], source: str, renames: Any = (),
                     skip: Any = frozenset(), which: str = "previous") -> dict[str, jax.Array]:
    """The params the previous stage trained that exist in this model (their names through `renames`, those in
    `skip` left out), on their shardings."""
    import orbax.checkpoint as ocp

    target = {}
    for p in meta["trainable_paths"]:
        q = renamed(p, renames)
        if q in flat_sh and q not in skip:
            a = flat_abstract[q]
            target[p] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_sh[q])
    if not target:
        return {}
    item = {"params": pg.unflatten({p: target.get(p, ocp.PLACEHOLDER) for p in meta["trainable_paths"]})}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding)
                                if isinstance(x, jax.ShapeDtypeStruct) else ocp.RestoreArgs(), item)
    with ocp.PyTreeCheckpointer() as ck:
        out = ck.restore(ckdir / str(step) / "state", args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    got = {renamed(p, renames): v for p, v in pg.flatten(out["params"]).items() if p in target}
    _log(f"init: {len(got)} params from {which} stage {ckdir}/{step}")
    return got


def _restore_stages(cfg: Any, stage: tuple[Path, int, dict[str, Any]], flat_sh: Mapping[str, Any],
                    flat_abstract: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Each param from the latest stage before this run that trained it: `init.checkpoint`'s trained params, then
    the ones its own `init.checkpoint` trained (through both stages' renames), and so on back. A stage's frozen
    params were exactly what the stages before it trained, so the run starts from what its predecessor saw
    (POINTS: instruct's OCR ViT is the one ocr_vit trained, frozen through pretrain)."""
    got: dict[str, jax.Array] = {}
    renames = tcfg.checkpoint_renames(cfg)
    source, seen = str(cfg.init.checkpoint), set()
    while stage is not None:
        got.update(_restore_trained(*stage, flat_sh, flat_abstract, source, renames, skip=got,
                                    which="previous" if not seen else "earlier"))
        seen.add(source)
        src = stage[2].get("frozen_source", {})
        earlier = str(src.get("checkpoint") or "")
        if not earlier or earlier in seen or find_trained_params(earlier) is None:
            break
        # an earlier stage's names -> its successor's (that stage's renames) -> ... -> this run's
        renames = [(a, renamed(b, renames)) for a, b in src.get("checkpoint_renames", [])] + list(renames)
        source, stage = earlier, _previous_stage(earlier)
    if not got:
        raise ConfigError(f"init.checkpoint={cfg.init.checkpoint}: none of its trained params exist in this model")
    return got


def expand_derived(derived: Mapping[str, str], paths: Any) -> dict[str, str]:
    """Subtree copies (target prefix -> source prefix) as leaf copies over the model's `paths`."""
    out = {}
    for p in paths:
        for tgt, src in derived.items():
            if p.startswith(tgt + "/"):
                out[p] = src + p[len(tgt):]
    return out


def _random(model: models.TrainModel, cfg: Any, mesh: Any, flat_sh: Mapping[str, Any], paths: list[str]
            ) -> dict[str, jax.Array]:
    if not paths:
        return {}

    def init(key: jax.Array) -> dict[str, jax.Array]:
        flat = pg.flatten(model.init(key))
        return {p: flat[p] for p in paths}  # the rest is dead code XLA drops

    with jax.set_mesh(mesh):
        key = jax.random.key(int(cfg.init.seed), impl=str(cfg.init.prng_impl))
        return jax.jit(init, out_shardings={p: flat_sh[p] for p in paths})(key)


def _copies(params: Mapping[str, jax.Array], derived: Mapping[str, str], flat_sh: Mapping[str, Any], mesh: Any
            ) -> dict[str, jax.Array]:
    if not derived:
        return {}
    targets = list(derived)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=[flat_sh[t] for t in targets])(
            [params[derived[t]] for t in targets])
    return dict(zip(targets, out))


def initial_params(cfg: Any, model: models.TrainModel, mesh: Any, flat_sh: Mapping[str, Any],
                   flat_abstract: Mapping[str, Any]) -> tuple[dict[str, jax.Array], dict[str, int]]:
    """Flat params of a new run (see the module docstring) and how many came from each source. Fills in
    `cfg.init.llm_checkpoint` / `vision_checkpoint` from the previous stage when they are empty."""
    stage = _previous_stage(cfg.init.checkpoint) if cfg.init.checkpoint else None
    if stage is not None:
        _inherit_frozen_sources(cfg, stage[2])
    loaded: dict[str, jax.Array] = {}
    counts = {}
    if cfg.init.llm_checkpoint:
        got = load_base_llm(cfg.init.llm_checkpoint, model, flat_sh)
        loaded.update(got)
        counts["llm_checkpoint"] = len(got)
    for tower in ("vision", "ocr_vision"):
        if cfg.init.get(f"{tower}_checkpoint"):
            got = load_vision(cfg.init[f"{tower}_checkpoint"], cfg, flat_sh, tower)
            loaded.update(got)
            counts[f"{tower}_checkpoint"] = len(got)
    previous = {} if stage is None else _restore_stages(cfg, stage, flat_sh, flat_abstract)
    counts["previous_stage"] = len(previous)
    # adapters are never copies: an IAA branch's insertion-layer adapters start fresh, not from the base's
    derived = {t: s for t, s in expand_derived(model.derived, lora_params.strip(flat_abstract)).items()
               if t not in previous}
    random_paths = [p for p in flat_abstract if p not in loaded and p not in previous and p not in derived]
    params = _random(model, cfg, mesh, flat_sh, random_paths)
    counts["lora"] = sum(1 for p in random_paths if lora_params.is_adapter(p))
    counts["random"] = len(random_paths) - counts["lora"]
    params.update(loaded)
    params.update(previous)
    params.update(_copies(params, derived, flat_sh, mesh))
    counts["copied"] = len(derived)
    if cfg.init.lora_checkpoint:
        got = {p: v for p, v in load_lora(cfg.init.lora_checkpoint, model, flat_sh).items() if p not in previous}
        params.update(got)
        counts["lora_checkpoint"] = len(got)
        counts["lora"] -= len(got)
    return {p: params[p] for p in flat_abstract}, counts


def load_lora(path: str | Path, model: models.TrainModel, flat_sh: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The adapters of the PEFT dir `path` on their shardings; they must be exactly the ones the run's LoRA
    rules make (same modules, ranks and scales), or a ConfigError names the first difference."""
    from mm.checkpoints.errors import ConversionError
    from mm.convert.llm_family import llm_name_map
    from mm.convert.peft_adapter import read_peft

    source = f"init.lora_checkpoint={path}"
    c = model.llm_config
    try:
        got = read_peft(paths.local_copy(path), llm_name_map(c), llm.adapter_candidates(c), mm_prefix=model.base_prefix)
    except ConversionError as e:
        raise ConfigError(f"{source}: {e}") from e
    want = {ad.prefix + leaf: ad for ad in model.adapters for leaf in lora_params.LEAVES}
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra or missing:
        raise ConfigError(f"{source}: adapters differ from param_groups' LoRA rules: in the dir only "
                          f"{[lora_params.kernel_of(p) for p in extra[:3]]}, in the rules only "
                          f"{[lora_params.kernel_of(p) for p in missing[:3]]}")
    for p, v in got.items():
        ad = want[p]
        box = {lora_params.A: ad.a, lora_params.B: ad.b, lora_params.SCALE: ad.scale}[p.rsplit("/", 1)[-1]]
        if tuple(v.shape) != tuple(box.value.shape):
            raise ConfigError(f"{source}: {p} has shape {tuple(v.shape)}, the rules make {tuple(box.value.shape)} "
                              f"(rank {ad.spec.rank})")
        scale = lora_params.scale(ad.spec.rank, ad.spec.alpha, ad.spec.rslora)
        if p.endswith(lora_params.SCALE) and not np.allclose(v, scale):
            raise ConfigError(f"{source}: {lora_params.kernel_of(p)}: scale {float(v):g} in the dir, "
                              f"{scale:g} from the rules' alpha")
    return {p: jax.device_put(np.asarray(v), flat_sh[p]) for p, v in got.items()}


def abstract_reference(trainable: Any) -> dict[str, Any]:
    """The shapes (on their shardings) of the `REFERENCE_KEY` subtree `build_reference` makes for
    `dpo.reference = ""`: the trainable params less LoRA adapters."""
    return pg.unflatten({p: v for p, v in pg.flatten(trainable).items() if not lora_params.is_adapter(p)})


def build_reference(cfg: Any, model: Any, trainable: Any, flat_sh: Mapping[str, Any], mesh: Any) -> dict[str, Any]:
    """The `REFERENCE_KEY` subtree (see the module docstring), on the params' shardings."""
    flat_t = pg.flatten(trainable)
    loaded = load_base_llm(cfg.dpo.reference, model, flat_sh) if cfg.dpo.reference else {}
    # adapters: off in the reference
    starting = [p for p in flat_t if p not in loaded and not lora_params.is_adapter(p)]
    with jax.set_mesh(mesh):  # fresh buffers: the train step donates (and updates) the trainable arrays
        copies = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=[flat_sh[p] for p in starting])(
            [flat_t[p] for p in starting])
    return pg.unflatten({**loaded, **dict(zip(starting, copies))})
