"""Tiny training configs shared by the training tests."""

from __future__ import annotations

from mm.train.config import base_config

GROUPS = {
    "full": [(".*", 1.0)],
    "head": [("(norm|lm_head)/.*", 1.0), (".*", "frozen")],
    "last_layer": [("layers_1/.*", 1.0), ("(norm|lm_head)/.*", 1.0), (".*", "frozen")],
}


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
