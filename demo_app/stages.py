"""The demo's three training stages as ordinary `mm-train` configs (`configs/demo.py:STAGE,WORKDIR`).

- `base`: the plain LLM learns the text task (text-only LLaVA JSON through the Grain pipeline);
- `iaa`: the `mm` branch (insertion layers, new embedding / norm / head, projector) learns the shapes data;
  the base LLM and the ViT are frozen;
- `llava`: projector and LLM learn the same data with the same steps, batch, learning rate and data order;
  the ViT is frozen.
Both multimodal stages start from the exported base (`init.llm_checkpoint`), or from a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from mm.train.schema import base_config

STAGES = ("base", "iaa", "llava")


def paths(workdir: str | Path) -> dict[str, Path]:
    """Everything the pipeline makes under its workdir: the data (`demo_app.data_dir.layout`), each stage's
    workdir and its export."""
    from demo_app.data_dir import layout

    w = Path(workdir)
    out = {"data": w / "data", **layout(w / "data")}
    for stage in STAGES:
        out[stage] = w / stage
        out[f"{stage}_export"] = w / stage / "export"
    return out


def tokenizer_dir(demo: Any, workdir: str | Path) -> str:
    """The tokenizer every stage uses: `init.tokenizer`, else the real LLM checkpoint's, else the generated one."""
    if demo.init.tokenizer:
        return str(demo.init.tokenizer)
    if demo.init.llm_checkpoint:
        p = Path(demo.init.llm_checkpoint)
        return str(p / "tokenizer" if (p / "tokenizer").is_dir() else p)
    return str(paths(workdir)["tokenizer"])


def base_llm_path(demo: Any, workdir: str | Path) -> str:
    return str(demo.init.llm_checkpoint or paths(workdir)["base_export"])


def llm_section(demo: Any, workdir: str | Path) -> dict[str, Any]:
    """`model.llm` for every stage: the real checkpoint's shapes, or the demo's tiny LLM with the generated
    tokenizer's special ids."""
    llm = dict(base_config().model.llm.to_dict())
    if demo.init.llm_checkpoint:
        from mm.train.from_checkpoints import llm_section as from_ckpt

        llm.update(from_ckpt(demo.init.llm_checkpoint))
        return llm
    llm.update(demo.model.llm.to_dict())
    tok = Path(tokenizer_dir(demo, workdir))
    if (tok / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        t = AutoTokenizer.from_pretrained(str(tok))
        llm.update(bos_token_id=t.bos_token_id, eos_token_id=[t.eos_token_id], pad_token_id=t.pad_token_id)
    return llm


def vision_section(demo: Any) -> dict[str, Any]:
    v = dict(base_config().model.vision.to_dict())
    if demo.init.vision_checkpoint:
        from mm.train.from_checkpoints import vision_section as from_ckpt

        v.update(from_ckpt(demo.init.vision_checkpoint))
    else:
        v.update(demo.model.vision.to_dict())
    return v


def iaa_positions(demo: Any, num_layers: int) -> list[int]:
    """`model.iaa_positions`, or by default an insertion layer after every frozen layer of an LLM of up to 4
    layers and IAA-14's pattern (pairs every 5 layers: 0, 1, 5, 6, ..., 30, 31 on 32 layers) above that."""
    if demo.model.iaa_positions:
        return [int(p) for p in demo.model.iaa_positions]
    if num_layers <= 4:
        return list(range(num_layers))
    return [q for i in range(0, num_layers, 5) for q in (i, i + 1) if q < num_layers]


def stage_config(demo: Any, stage: str, workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config of `stage` for a demo whose pipeline workdir is `workdir`."""
    if stage not in STAGES:
        raise ValueError(f"configs/demo.py: unknown stage {stage!r}; choose one of {STAGES}")
    p = paths(workdir)
    c = base_config()
    c.name = f"demo_{stage}"
    c.model.llm = llm_section(demo, workdir)
    c.init.seed = int(demo.seed)
    c.init.prng_impl = "unsafe_rbg"  # weight init compiles in a fraction of threefry's time on CPU
    c.metrics.tensorboard = False
    c.checkpoint.update(dict(every=0, keep=1, use_async=False))  # the final step only: stages are short
    c.data.update(dict(kind="llava_json", tokenizer=tokenizer_dir(demo, workdir), template="chat", pack=True,
                       seed=int(demo.seed) + 1, eval_seed=int(demo.seed) + 2))
    budget = demo.base if stage == "base" else demo.mm
    c.train.update(dict(steps=int(budget.steps), batch_size=int(budget.batch_size), seq_len=int(budget.seq_len),
                        log_every=max(1, int(budget.steps) // 20), eval_every=0))
    c.optim.update(dict(lr=float(budget.lr), warmup_frac=0.05, min_lr_ratio=0.1, weight_decay=0.0))
    if stage == "base":
        c.model.kind = "llm"
        c.data.update(dict(path=str(p["text_train"]), eval_path=str(p["text_eval"]), tiling="square"))
        c.param_groups = [(".*", 1.0)]
        return c
    c.model.vision = vision_section(demo)
    c.model.vision_select_layer = int(demo.model.vision_select_layer)
    c.model.projector = str(demo.model.projector)
    c.init.llm_checkpoint = base_llm_path(demo, workdir)
    if demo.init.vision_checkpoint:
        c.init.vision_checkpoint = str(demo.init.vision_checkpoint)
    c.data.update(dict(path=str(p["mm_train"]), eval_path=str(p["mm_eval"]), image_root=str(p["images"]),
                       tiling="square", max_tiles_per_row=4))
    if stage == "iaa":
        c.model.kind = "iaa"
        c.model.iaa_branches = ["mm"]
        c.model.iaa_workflow = "mm"
        c.model.iaa_positions = iaa_positions(demo, int(c.model.llm['num_layers']))
        c.param_groups = [("mm/.*", 1.0), ("(base|vision)/.*", "frozen")]
    else:
        c.model.kind = "llava"
        c.param_groups = [("(projector|llm)/.*", 1.0), ("vision/.*", "frozen")]
    return c
