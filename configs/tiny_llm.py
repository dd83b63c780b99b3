"""Tiny text LM (the plain LLM trained as a language model on synthetic data): smoke runs and tests.

Variants: `full` (everything trains), `head` (only the final norm and LM head train),
`last_layer` (last decoder layer + head train).
"""

from mm.train.schema import base_config


def get_config(arg: str = "full"):
    c = base_config()
    c.name = f"tiny_llm_{arg}"
    c.train.steps = 20
    c.train.batch_size = 8
    c.train.seq_len = 32
    c.train.log_every = 1
    c.checkpoint.every = 5
    groups = {
        "full": [(".*", 1.0)],
        "head": [("(norm|lm_head)/.*", 1.0), (".*", "frozen")],
        "last_layer": [("layers_1/.*", 1.0), ("(norm|lm_head)/.*", 2.0), (".*", "frozen")],
    }
    if arg not in groups:
        raise ValueError(f"configs/tiny_llm.py: unknown variant {arg!r}; choose one of {sorted(groups)}")
    c.param_groups = groups[arg]
    return c
