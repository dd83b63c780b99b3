"""`mm-sizes`: parameter counts (total / trainable / frozen, per module) of a model config, from shapes only.

    mm-sizes --llm llama3-8b --model iaa14            # ~4.13B trainable in the mm branch, Llama-3-8B frozen
    mm-sizes --llm path/to/config.json --model llava --stage 2 --vision clip-l-336
    mm-sizes --model points --stage pretrain           # POINTS' release shapes, trainable per configs/points.py

Nothing is allocated: shapes come from `jax.eval_shape` of the model's init, so an 8B or 70B config is
counted in a second on a laptop. Trainable follows the paper's recipes: IAA trains the branch (projector,
insertion layers, new embedding, norm and head) with the LLM and tower frozen; LLaVA stage 1 trains the
projector, stage 2 the projector and the LLM.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

LLM_PRESETS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_theta=500000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128, attention_bias=True, rope_theta=1e6),
}
VISION_PRESETS = {
    "clip-l-336": dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                       patch_size=14),
    "siglip-so400m": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_layers=27,
                          num_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                          layer_norm_eps=1e-6),
}


def _llm_config(spec: str) -> Any:
    from mm.config import LLMConfig, read_json

    if spec in LLM_PRESETS:
        return LLMConfig(**LLM_PRESETS[spec])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    return LLMConfig.from_hf_dict(read_json(path), source=str(path))


def _vision_config(spec: str | None) -> Any:
    from mm.config import VisionConfig, read_json

    if spec is None:
        return None
    if spec in VISION_PRESETS:
        return VisionConfig(**VISION_PRESETS[spec])
    path = Path(spec)
    from mm.convert.hf_vision import vision_config_from_hf

    return vision_config_from_hf(read_json(path / "config.json" if path.is_dir() else path), source=str(path))


def count(model: str, llm_spec: str, vision_spec: str | None = "clip-l-336", stage: int = 2,
          vision_width: int | None = None) -> list[tuple[str, int, bool]]:
    """`(module, parameters, trainable)` rows from abstract shapes only."""
    import flax.linen as nn
    import jax

    from mm.models import iaa, llava, vision
    from mm.config import ProjectorConfig

    llm_cfg = _llm_config(llm_spec)
    vis_cfg = _vision_config(vision_spec)
    width = vision_width or (vis_cfg.hidden_size if vis_cfg is not None else 1024)
    if model in ("iaa14", "iaa8"):
        cfg = iaa.preset(model, llm_cfg, vision_width=width, branches=("mm",))
        tree = nn.unbox(iaa.abstract_params(cfg))
        trainable = re.compile(r"^mm/")
    elif model == "llava":
        cfg = llava.LLaVAConfig(llm=llm_cfg, projector=ProjectorConfig(in_dim=width, out_dim=llm_cfg.hidden_size))
        tree = nn.unbox(llava.abstract_params(cfg))
        trainable = re.compile(r"^projector/" if stage == 1 else r"^(projector|llm)/")
    else:
        raise ValueError(f"--model {model!r}: choose iaa14, iaa8 or llava")
    if vis_cfg is not None:
        tree["vision"] = nn.unbox(vision.abstract_params(vis_cfg))
    rows: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [p.key for p in path]
        name = "/".join(keys)
        module = keys[0] + "/" + re.sub(r"_\d+$", "_*", keys[1]) if len(keys) > 2 else keys[0]
        r = rows.setdefault(module, [0, bool(trainable.match(name))])
        r[0] += int(leaf.size)
    return [(m, n, t) for m, (n, t) in rows.items()]


POINTS_STAGES = ("ocr_vit", "pretrain", "instruct")


def points_count(stage: str, preset: str = "points_yi9b") -> list[tuple[str, int, bool]]:
    """`(module, parameters, trainable)` rows of a POINTS stage (`configs/points.py:STAGE,PRESET`), trainability
    from the stage's own parameter groups (a module with trained and frozen params gives a row of each)."""
    import flax.linen as nn

    from mm.config import load_config_file
    from mm.train import models, param_groups as pg

    if stage not in POINTS_STAGES:
        raise ValueError(f"--stage {stage!r}: POINTS stages are {', '.join(POINTS_STAGES)}")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config_file(f"{root}/configs/points.py:{stage},{preset}")
    flat = pg.flatten(nn.unbox(models.build(cfg).abstract))
    assignment = pg.assign(list(flat), list(cfg.param_groups))
    rows: dict[tuple[str, bool], int] = {}
    for name, leaf in flat.items():
        keys = name.split("/")
        module = "/".join(keys[:2]) if len(keys) > 2 else keys[0]
        key = (re.sub(r"_\d+$", "_*", module), assignment.is_trainable(name))
        rows[key] = rows.get(key, 0) + int(leaf.size)
    return [(m, n, t) for (m, t), n in rows.items()]


def render(rows: list[tuple[str, int, bool]]) -> str:
    total = sum(n for _, n, _ in rows)
    train = sum(n for _, n, t in rows if t)
    lines = [f"{'module':<32} {'parameters':>16}  status"]
    lines += [f"{m:<32} {n:>16,}  {'trainable' if t else 'frozen'}" for m, n, t in rows]
    lines += ["-" * 60, f"{'total':<32} {total:>16,}  ({total / 1e9:.2f}B)",
              f"{'trainable':<32} {train:>16,}  ({train / 1e9:.2f}B)",
              f"{'frozen':<32} {total - train:>16,}  ({(total - train) / 1e9:.2f}B)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mm-sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=["iaa14", "iaa8", "llava", "points"])
    p.add_argument("--llm", default="llama3-8b", help=f"preset {sorted(LLM_PRESETS)} or an HF config.json / dir")
    p.add_argument("--vision", default="clip-l-336", help=f"preset {sorted(VISION_PRESETS)}, an HF dir, or 'none'")
    p.add_argument("--stage", default=None, help="LLaVA stage 1 (projector only) or 2 (default); POINTS stage "
                   f"{' | '.join(POINTS_STAGES)} (default pretrain; configs/points.py, release shapes)")
    args = p.parse_args(argv)
    from launch import cli

    return cli.run("mm-sizes", _print_sizes, args)  # a config.json that is not there or not a model: status 2


def _print_sizes(args: argparse.Namespace) -> int:
    if args.model == "points":
        print(render(points_count(args.stage or "pretrain")))
        return 0
    if args.stage not in (None, "1", "2"):
        raise ValueError(f"--stage {args.stage!r}: LLaVA stages are 1 and 2")
    stage = int(args.stage or 2)
    print(render(count(args.model, args.llm, None if args.vision == "none" else args.vision, stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
