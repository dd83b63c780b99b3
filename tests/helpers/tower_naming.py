"""The two namings of a saved CLIP / SigLIP tower's tensors, made from one transformers save.

Hub checkpoints and transformers 4 put the tower's tensors under the `vision_model.` module
(`vision_model.embeddings.class_embedding`); transformers >= 5.24 saves `CLIPVisionModel` /
`SiglipVisionModel` without it (`embeddings.class_embedding`). Whatever the installed transformers writes,
`set_tower_module` rewrites a saved directory's safetensors keys (and its index) into the naming asked for,
so tests can load both and compare.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.numpy import load_file, save_file

MODULE = "vision_model."
INDEX = "model.safetensors.index.json"


def _renamed(name: str, container: str, with_module: bool) -> str:
    if not name.startswith(container):
        return name
    rest = name[len(container):]
    if with_module and not rest.startswith(MODULE):
        return container + MODULE + rest
    if not with_module and rest.startswith(MODULE):
        return container + rest[len(MODULE):]
    return name


def set_tower_module(directory: Path, container: str = "", with_module: bool = True) -> int:
    """Renames, in every `*.safetensors` file of `directory`, the tensors under `container` so they are (or
    are not) under `vision_model.`; returns how many names changed. With `container=""` every tensor is
    taken to be the tower's (a standalone `CLIPVisionModel` / `SiglipVisionModel` directory)."""
    directory = Path(directory)
    changed = 0
    mapping: dict[str, str] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(f))
        new = {_renamed(k, container, with_module): v for k, v in tensors.items()}
        assert len(new) == len(tensors), f"{f}: renaming would merge tensors"
        mapping.update({k: _renamed(k, container, with_module) for k in tensors})
        changed += sum(k not in tensors for k in new)
        save_file(new, str(f), metadata={"format": "pt"})
    index = directory / INDEX
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = {mapping.get(k, k): v for k, v in d["weight_map"].items()}
        index.write_text(json.dumps(d))
    return changed


def both_namings(src: Path, dst: Path, container: str = "") -> dict[bool, Path]:
    """Copies of the saved directory `src` under `dst/with_module` and `dst/without_module`, one per naming;
    asserts they differ (so a test of both namings really has two)."""
    out = {}
    for with_module in (True, False):
        d = Path(dst) / ("with_module" if with_module else "without_module")
        shutil.copytree(src, d)
        set_tower_module(d, container, with_module)
        out[with_module] = d
    names = {w: {k for f in d.glob("*.safetensors") for k in load_file(str(f))} for w, d in out.items()}
    assert names[True] != names[False] and any(k.startswith(container + MODULE) for k in names[True]) and not any(
        k.startswith(container + MODULE) for k in names[False]), "the two namings are not distinct"
    return out
