"""A finished training run -> an mm checkpoint directory that `mm.from_pretrained` loads.

Training checkpoints hold only what trained (frozen weights are referenced, see `mm.train.checkpoint`), so
the export rebuilds the run from its `config.json` exactly as training did (`mm.train.loop.build`: init,
`init.llm_checkpoint`, `init.vision_checkpoint`, `init.checkpoint`), restores the trained params of the chosen
step and writes the whole model: kind "llm" for a plain LLM, kind "vlm" (ViT + IAA or LLaVA-style) when the
run has a ViT in the step. The tokenizer the run read (`data.tokenizer`) is copied in. Written atomically:
a failed export leaves no partial directory and never touches an existing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from mm import paths
from mm.config import ConfigError, read_json
from mm.train import schema as tcfg


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = paths.as_path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{workdir}: no config.json (not an mm-train workdir)")
    d = read_json(path)
    try:
        tcfg.check_schema(d)  # a hand-edited or foreign config.json: name the key, not an AttributeError later
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    missing = [k for k in tcfg.base_config() if k not in d]
    if missing:  # mm-train writes every section: this file was cut short or written by something else
        raise ConfigError(f"{path}: no {missing[0]!r} section (not a config.json that mm-train wrote)")
    cfg = ml_collections.ConfigDict(d)
    cfg.param_groups = [tuple(g) for g in cfg.param_groups]
    return cfg


def trained_params(workdir: str | Path, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """(config, full params as numpy, step) of a run's finished checkpoint (the latest unless `step`)."""
    from mm.train.checkpoint import Checkpointer
    from mm.train.loop import build
    from mm.train.param_groups import merge
    from mm.train.preference import without_reference

    cfg = read_run_config(workdir)
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    cfg.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    ck = Checkpointer(workdir, keep=1000, use_async=False)
    try:
        steps = ck.manager.all_steps()
        if not steps:
            raise ConfigError(f"{workdir}: no finished training checkpoint to export")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise ConfigError(f"{workdir}: no checkpoint for step {step}; finished steps are {sorted(steps)}")
        b = build(cfg, log=False, devices=jax.devices()[:1])
        state, _, _ = ck.restore(step, b.state)
    finally:
        ck.close()
    params = jax.tree.map(np.asarray, merge(state["params"], without_reference(b.frozen)))  # not a DPO reference
    return cfg, params, step


def vlm_config(cfg: Any) -> Any:
    from mm.config import IMAGE_TOKEN_ID
    from mm.train import models

    image_token = IMAGE_TOKEN_ID
    if cfg.data.tokenizer:  # the id training put at image positions
        from transformers import AutoTokenizer

        from mm.data.conversations import image_token_id_of

        image_token = image_token_id_of(AutoTokenizer.from_pretrained(str(paths.local_copy(cfg.data.tokenizer))))
    return models.model_config(cfg, image_token_id=image_token)  # what the run trained (POINTS' towers included)


def _tokenizer_source(cfg: Any) -> Path | None:
    from mm.convert.llm_family import tokenizer_dir_of

    for d in (cfg.data.tokenizer, cfg.init.llm_checkpoint):
        if d:
            found = tokenizer_dir_of(paths.local_copy(d))
            if found is not None:
                return found
    return None


def _lora(workdir: str | Path, cfg: Any, params: Any, dst: str | Path, merge_lora: bool, lora_format: str | None,
          overwrite: bool) -> tuple[Any, Path | None]:
    """A LoRA run's params for the export (`merge_lora`: adapters merged into their kernels), or the PEFT
    adapter dir written (`lora_format="peft"`); a LoRA run needs one of the two, a run without adapters none."""
    from mm import lora_params
    from mm.train import param_groups as pg

    flat = pg.flatten(params)
    has = any(lora_params.is_adapter(k) for k in flat)
    if not has:
        if merge_lora or lora_format:
            raise ConfigError(f"{workdir}: --merge-lora / --lora-format: this run trained no LoRA adapters")
        return params, None
    if merge_lora and lora_format:
        raise ConfigError("--merge-lora and --lora-format: choose one (merged weights, or the adapters alone)")
    if lora_format == "peft":
        if cfg.model.kind != "llm":
            raise ConfigError(f"{workdir}: --lora-format peft needs model.kind llm (an HF causal LM as PEFT's base); "
                              f"this run is {cfg.model.kind!r}: use --merge-lora")
        from mm.convert.llm_family import llm_name_map
        from mm.convert.peft_adapter import write_peft

        return None, write_peft(dst, flat, llm_name_map(tcfg.llm_config_from(cfg)),
                                base_model=str(cfg.init.llm_checkpoint), overwrite=overwrite)
    if lora_format is not None:
        raise ConfigError(f"--lora-format {lora_format!r}: the one format is 'peft'")
    if not merge_lora:
        raise ConfigError(f"{workdir}: this run trained LoRA adapters; pass --merge-lora (the merged model) or "
                          "--lora-format peft (the adapters alone, for peft.PeftModel.from_pretrained)")
    return pg.unflatten(lora_params.merged(flat)), None


def export_run(workdir: str | Path, dst: str | Path, *, step: int | None = None, overwrite: bool = False,
               merge_lora: bool = False, lora_format: str | None = None) -> Any:
    """Writes the run's model at `step` (default: the latest finished) to the mm directory `dst`; a LoRA run's
    merged model (`merge_lora`) or its adapters as a PEFT dir (`lora_format="peft"`). `workdir` and `dst` may be
    URIs: a URI `dst` is written locally, then uploaded with its manifest last."""
    if not paths.is_remote(dst):
        return _export_local(workdir, dst, step=step, overwrite=overwrite, merge_lora=merge_lora,
                             lora_format=lora_format)
    import shutil
    import tempfile

    from mm.checkpoints import mm_dir as mmd

    target = paths.as_path(dst)
    if target.exists() and not overwrite:
        raise ConfigError(f"{dst}: already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix="mm-export-"))
    try:
        local = _export_local(workdir, tmp / target.name, step=step, overwrite=False, merge_lora=merge_lora,
                              lora_format=lora_format)
        if target.exists():
            target.rmtree()
        paths.upload_tree(local, target, last=(mmd.MM_CONFIG_FILE, "adapter_config.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _export_local(workdir: str | Path, dst: str | Path, *, step: int | None, overwrite: bool, merge_lora: bool,
                  lora_format: str | None) -> Path:
    from mm.convert import registry

    cfg, params, step = trained_params(workdir, step)
    params, written = _lora(workdir, cfg, params, dst, merge_lora, lora_format, overwrite)
    if written is not None:
        return written
    source = {"format": "mm-train", "workdir": str(paths.as_path(workdir)), "step": step}
    tok = _tokenizer_source(cfg)
    if cfg.model.kind == "llm":
        return registry.save("llm", tcfg.llm_config_from(cfg), params, dst, overwrite=overwrite, tokenizer_dir=tok,
                             source=source)
    if not tcfg.has_tower(cfg):
        raise ConfigError(f"{workdir}: model.kind={cfg.model.kind!r} trained on precomputed image features (data.kind="
                          f"{cfg.data.kind!r}), so it has no vision tower; nothing loadable can be exported")
    return registry.save("vlm", vlm_config(cfg), params, dst, overwrite=overwrite, tokenizer_dir=tok, source=source)
