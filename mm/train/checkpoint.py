"""Training checkpoints: Orbax `CheckpointManager` in `<workdir>/checkpoints`, async, keep-N.

Each step directory holds `state` (trainable params, optimizer state, step, RNG, skip counters), `data` (the
data iterator's state) and `meta` (where the frozen weights come from, the parameter paths trained). Frozen
weights are *referenced* (`init.llm_checkpoint` / `init.checkpoint` / the init seed), never rewritten: they
do not change, and rewriting a frozen 8B base every save would dominate checkpoint I/O.

Orbax writes a step into a temporary directory and renames it when complete; `latest_step` only ever sees
finished steps, so a process killed in the middle of an async save resumes from the previous good one.
Restoring takes abstract arrays with shardings, so a checkpoint restores onto any mesh.

The data state is per process: Grain's Orbax handler (`grain.checkpoint.CheckpointSave`) writes each process's
iterator state to `data/process_<i>-of-<n>.json`, and each process restores its own. A run resumed on a
different number of processes gets every saved process's state (a list) and its source decides the order from
there (`mm.train.grain_source.GrainSource.reshard`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mm.paths import as_path


class _StateItem:
    """A JSON data state in the shape Grain's Orbax handler saves and restores (`get_state` bytes). The state is
    taken when the save is asked for, so an async save writes that step's state even as the iterator moves on."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:  # called by Grain's handler after a restore
        pass


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int, use_async: bool = True):
        self.directory = as_path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(_StateItem(data_state)),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, target_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(`state` laid out like `target_state` - arrays or ShapeDtypeStructs with shardings -, this process's data
        state, meta). The data state is a list of every saved process's when the checkpoint was written by a
        different number of processes."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        data_dir = self.directory / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        args = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        if own.exists():
            args["data"] = grain.checkpoint.CheckpointRestore(_StateItem())
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        if own.exists():
            return out["state"], out["data"].state, out["meta"]
        return out["state"], self.saved_data_states(step), out["meta"]

    def saved_data_states(self, step: int) -> list[Any]:
        """Every process's data state of `step`, by process index."""
        data_dir = self.directory / str(step) / "data"
        files = {int(f.name.split("_")[1].split("-")[0]): f for f in data_dir.glob("process_*-of-*.json")}
        if not files or sorted(files) != list(range(len(files))):
            raise ValueError(f"{data_dir}: expected data states process_<i>-of-<n>.json for i = 0..n-1, found "
                             f"{sorted(f.name for f in files.values())}")
        return [json.loads(files[i].read_text()) for i in range(len(files))]

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_trained_params(path: str | Path) -> tuple[epath.Path, int] | None:
    """A previous stage's workdir (or its `checkpoints` dir) -> (checkpoints dir, latest step), if any."""
    p = as_path(path)
    for d in (p / "checkpoints", p):
        if d.is_dir():
            steps = [int(x.name) for x in d.iterdir() if x.name.isdigit() and (x / "state").exists()]
            if steps:
                return d, max(steps)
    return None
