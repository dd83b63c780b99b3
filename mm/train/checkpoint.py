"""Training checkpoints: Orbax `CheckpointManager` in `<workdir>/checkpoints`, async, keep-N.

Each step directory holds `state` (trainable params, optimizer state, step, RNG, skip counters), `data` (the
data iterator's state) and `meta` (where the frozen weights come from, the parameter paths trained). Frozen
weights are *referenced* (`init.llm_checkpoint` / `init.checkpoint` / the init seed), never rewritten: they
do not change, and rewriting a frozen 8B base every save would dominate checkpoint I/O.

Orbax writes a step into a temporary directory and renames it when complete; `latest_step` only ever sees
finished steps, so a process killed in the middle of an async save resumes from the previous good one.
Restoring takes abstract arrays with shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int, use_async: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores `state` laid out like `target_state` (arrays or ShapeDtypeStructs with shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_trained_params(path: str | Path) -> tuple[Path, int] | None:
    """A previous stage's workdir (or its `checkpoints` dir) -> (checkpoints dir, latest step), if any."""
    p = Path(path).absolute()
    for d in (p / "checkpoints", p):
        if d.is_dir():
            steps = [int(x.name) for x in d.iterdir() if x.name.isdigit() and (x / "state").exists()]
            if steps:
                return d, max(steps)
    return None
