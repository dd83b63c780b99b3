"""Tiny training configs shared by the training tests, the tiny LLaVA JSON set they train on, and `get_config`
for runs of these configs through the CLI (`--config=tests/train/helpers_train.py:VARIANT`)."""

from __future__ import annotations

from mm.train.schema import base_config

GROUPS = {
    "full": [(".*", 1.0)],
    "head": [("(norm|lm_head)/.*", 1.0), (".*", "frozen")],
    "last_layer": [("layers_1/.*", 1.0), ("(norm|lm_head)/.*", 1.0), (".*", "frozen")],
}


def config_with(spec: str, overrides: dict):
    """`--config=spec` with `--config.sec.key=value` overrides applied, as mm-train would see them (for the
    in-process reference run of a test that runs the same config through the CLI)."""
    from mm.config import load_config_file

    cfg = load_config_file(spec)
    cfg.unlock()
    for k, v in overrides.items():
        sec, key = k.split(".")
        cfg[sec][key] = v
    return cfg


def tiny(variant: str = "full", **llm):
    c = base_config()
    c.model.llm.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, **llm))
    c.train.update(dict(steps=6, batch_size=8, seq_len=16, log_every=1))
    c.checkpoint.every = 2
    c.init.prng_impl = "unsafe_rbg"  # compiles in a fraction of threefry's time on CPU
    c.metrics.tensorboard = False
    c.param_groups = GROUPS[variant]
    return c


def tiny_iaa_llava(path: str = "", image_root: str = "", tokenizer: str = ""):
    """The tiny IAA instruction stage on the Grain pipeline (`data.kind = "llava_json"`): the `mm` branch
    trains, base LLM and ViT (run in the step on the pipeline's tiles) are frozen; first-fit packing."""
    c = tiny("full")
    c.model.kind = "iaa"
    c.model.iaa_branches = ["mm"]
    c.param_groups = [("mm/.*", 1.0), ("(base|vision)/.*", "frozen")]
    c.data.update(dict(kind="llava_json", path=path, image_root=image_root, tokenizer=tokenizer, template="chat",
                       pack=True, max_tiles_per_row=4))
    c.train.update(dict(batch_size=4, seq_len=96))
    c.optim.update(dict(lr=3e-3, warmup_frac=0.0, grad_accum=2))
    return c


def write_tiny_llava(d) -> tuple[str, str, str]:
    """A generated LLaVA JSON set (24 rows with images) plus one planted corrupt image, and a tokenizer dir that
    fits `tiny()`'s vocabulary: returns (data.path, data.image_root, data.tokenizer)."""
    import json
    from pathlib import Path

    from mm.data.synthetic import write_llava_dataset
    from tests.helpers.tokenizer import make_tokenizer

    d = Path(d)
    path, root = write_llava_dataset(str(d), 24, seed=5, min_side=16, max_side=60)
    (Path(root) / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
    rows = json.loads(Path(path).read_text())
    rows.append({"id": "planted_corrupt", "image": "corrupt.png",
                 "conversations": [{"from": "human", "value": "<image>\nwhat is this?"},
                                   {"from": "gpt", "value": "a cat"}]})
    Path(path).write_text(json.dumps(rows))
    make_tokenizer().save_pretrained(str(d / "tok"))
    return path, root, str(d / "tok")


def get_config(arg: str = "iaa_llava"):
    """`--config=tests/train/helpers_train.py:iaa_llava` (or `:full`, ... for `tiny`) for runs through the CLI in a
    subprocess (data paths
    come as `--config.data.*` overrides)."""
    if arg == "iaa_llava":
        return tiny_iaa_llava()
    if arg in GROUPS:
        return tiny(arg)
    raise ValueError(f"tests/train/helpers_train.py: unknown variant {arg!r}; choose iaa_llava or one of "
                     f"{sorted(GROUPS)}")
