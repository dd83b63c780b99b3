"""Readers: where the engine's tensors come from. Each knows every tensor's shape and dtype from metadata alone
(so a conversion is checked before any data is read) and streams data in the order asked.

Keys are HF names on the "hf" side and mm paths (tuples) on the "mm" side; `mm.checkpoints.engine.convert`
matches them to a name map. Readers:

  SafetensorsReader  an HF safetensors dir (single file or sharded with an index); reads ahead on a thread and
                     reads row / column regions (`read_rows`) for sharded placement.
  MMDirReader        an mm directory's Orbax `params/`: one save unit restored at a time, the next on a thread;
                     `read_placed` restores straight onto shardings (each host reads only its chunks).
  TreeReader         an in-memory param tree (numpy or jax arrays), e.g. a trained model being exported.
  ChainReader        several readers as one (an IAA release and the vision tower it points to).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
from flax import traverse_util

from mm.checkpoints import mm_dir as mmd
from mm.checkpoints.errors import ConversionError
from mm.checkpoints.name_map import MMPath, save_unit
from mm.checkpoints.safetensors_io import SafetensorsCheckpoint

Key = Hashable  # an HF name (str) or an mm path (tuple of str)


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Reader:
    """The interface: `side` ("hf" | "mm"), `source` (for messages), `tensors()`, `iter(keys)`, `close()`.
    Optional: `read_rows(key, r0, r1, cols)` (regional reads), `read_placed(keys, shardings, dtypes)`,
    `files()` (key -> file name, for messages)."""

    side: str = "hf"
    source: str = ""

    def tensors(self) -> Mapping[Key, TensorMeta]:
        raise NotImplementedError

    def iter(self, keys: Sequence[Key]) -> Iterator[tuple[Key, np.ndarray]]:
        raise NotImplementedError

    def files(self) -> Mapping[Key, str]:
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsReader(Reader):
    """An HF safetensors checkpoint directory; `namespace` prefixes every name (to chain it beside another)."""

    side = "hf"

    def __init__(self, directory: str | Path, namespace: str = ""):
        self.ckpt = SafetensorsCheckpoint(directory)
        self.namespace = namespace
        self.source = str(directory)
        self._meta = {namespace + n: TensorMeta(t.shape, t.dtype) for n, t in self.ckpt.tensors.items()}

    def _name(self, key: Key) -> str:
        return str(key)[len(self.namespace):]

    def tensors(self) -> Mapping[Key, TensorMeta]:
        return self._meta

    def files(self) -> Mapping[Key, str]:
        return {self.namespace + n: t.file.name for n, t in self.ckpt.tensors.items()}

    def iter(self, keys: Sequence[Key]) -> Iterator[tuple[Key, np.ndarray]]:
        for name, arr in self.ckpt.iter_tensors([self._name(k) for k in keys]):
            yield self.namespace + name, arr

    def read_rows(self, key: Key, r0: int, r1: int, cols: slice) -> np.ndarray:
        return self.ckpt.read_rows(self._name(key), r0, r1, cols)

    def close(self) -> None:
        self.ckpt.close()


class MMDirReader(Reader):
    """The params of an mm directory (read-only; `mm.checkpoints.mm_dir`)."""

    side = "mm"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.source = str(self.directory / mmd.PARAMS_DIR)
        self._meta = {p: TensorMeta(s, d) for p, (s, d) in mmd.params_metadata(self.directory).items()}

    def tensors(self) -> Mapping[Key, TensorMeta]:
        return self._meta

    def _restore(self, keys: Sequence[MMPath], dtypes: Mapping[MMPath, Any] | None = None,
                 shardings: Mapping[MMPath, Any] | None = None) -> dict[MMPath, Any]:
        dt = {k: self._meta[k].dtype if dtypes is None else dtypes[k] for k in keys}
        tree = mmd.load_param_paths(self.directory, keys, dt, {k: self._meta[k].shape for k in keys}, shardings)
        return traverse_util.flatten_dict(tree)

    def iter(self, keys: Sequence[Key], read_ahead_bytes: int = 1024**3) -> Iterator[tuple[Key, np.ndarray]]:
        """Consecutive keys of one save unit are restored together; unit k+1 is restored on a thread while the
        caller works on unit k when both fit in `read_ahead_bytes` (else once the caller is done with k)."""
        groups: list[list[MMPath]] = []
        for k in keys:
            if groups and save_unit(groups[-1][-1]) == save_unit(k):
                groups[-1].append(k)
            else:
                groups.append([k])
        if not groups:
            return
        size = [sum(self._meta[k].nbytes for k in g) for g in groups]
        with ThreadPoolExecutor(1, thread_name_prefix="mm-dir-read") as pool:
            nxt = pool.submit(self._restore, groups[0])
            for i, group in enumerate(groups):
                flat = nxt.result()
                ahead = i + 1 < len(groups) and size[i] + size[i + 1] <= read_ahead_bytes
                nxt = pool.submit(self._restore, groups[i + 1]) if ahead else None
                for k in group:
                    yield k, np.asarray(flat.pop(k))
                del flat
                if nxt is None and i + 1 < len(groups):
                    nxt = pool.submit(self._restore, groups[i + 1])

    def read_placed(self, keys: Sequence[Key], shardings: Mapping[Key, Any], dtypes: Mapping[Key, Any]
                    ) -> dict[Key, Any]:
        """`keys` restored as jax arrays straight onto `shardings` in `dtypes` (Orbax's sharded restore)."""
        return self._restore(list(keys), dtypes, shardings)


class TreeReader(Reader):
    """An in-memory param tree (nested dicts of numpy / jax arrays) keyed by mm path, or with `side="hf"` a
    flat HF state dict (name -> array)."""

    def __init__(self, tree: Mapping[str, Any], source: str = "params", side: str = "mm"):
        self.source, self.side = source, side
        self._flat = traverse_util.flatten_dict(dict(tree)) if side == "mm" else dict(tree)
        self._meta = {k: TensorMeta(tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in self._flat.items()}

    def tensors(self) -> Mapping[Key, TensorMeta]:
        return self._meta

    def iter(self, keys: Sequence[Key]) -> Iterator[tuple[Key, np.ndarray]]:
        for k in keys:
            yield k, np.asarray(self._flat[k])


class ChainReader(Reader):
    """Several readers of one side as one; their keys must be disjoint."""

    def __init__(self, readers: Sequence[Reader]):
        self.readers = list(readers)
        sides = {r.side for r in self.readers}
        if len(sides) != 1:
            raise ValueError(f"ChainReader: readers of different sides {sorted(sides)}")
        self.side = sides.pop()
        self.source = " + ".join(r.source for r in self.readers)
        self._owner: dict[Key, Reader] = {}
        for r in self.readers:
            for k in r.tensors():
                if k in self._owner:
                    raise ConversionError(f"{k} is in both {self._owner[k].source} and {r.source}")
                self._owner[k] = r
        self._meta = {k: m for r in self.readers for k, m in r.tensors().items()}

    def tensors(self) -> Mapping[Key, TensorMeta]:
        return self._meta

    def files(self) -> Mapping[Key, str]:
        return {k: f for r in self.readers for k, f in r.files().items()}

    def iter(self, keys: Sequence[Key]) -> Iterator[tuple[Key, np.ndarray]]:
        """Runs of consecutive keys from one reader are streamed by that reader (its read-ahead intact)."""
        i = 0
        while i < len(keys):
            owner = self._owner[keys[i]]
            j = i
            while j < len(keys) and self._owner[keys[j]] is owner:
                j += 1
            yield from owner.iter(keys[i:j])
            i = j

    def read_rows(self, key: Key, r0: int, r1: int, cols: slice) -> np.ndarray:
        return self._owner[key].read_rows(key, r0, r1, cols)  # type: ignore[attr-defined]

    def close(self) -> None:
        for r in self.readers:
            r.close()

