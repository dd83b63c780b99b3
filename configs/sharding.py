"""Mesh layouts: `get_config("dp" | "fsdp" | "fsdp_tp")`.

- dp: pure data parallel; parameters replicated (the `embed` axis maps to nothing).
- fsdp: parameters and optimizer state sharded over all devices (ZeRO-3 style).
- fsdp_tp: FSDP x tensor parallel (heads, MLP and vocab over `tensor`); `tensor` defaults to 2.
"""

import ml_collections


def get_config(arg: str = "fsdp") -> ml_collections.ConfigDict:
    layouts = {
        "dp": dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules=dict(embed=None)),
        "fsdp": dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules=dict()),
        "fsdp_tp": dict(mesh=dict(data=1, fsdp=-1, tensor=2), rules=dict()),
    }
    if arg not in layouts:
        raise ValueError(f"configs/sharding.py: unknown layout {arg!r}; choose one of {sorted(layouts)}")
    return ml_collections.ConfigDict(layouts[arg])
