"""Resumable per-row output of a pass over rows that several processes share (`mm-ppl score`, `mm-bpo negatives`).

    OUT/meta.json                       what the records depend on; a restart with other values is refused
    OUT/{prefix}-p{P}-{C:05d}.jsonl     process P's chunk C, written to a temp name and renamed: one JSON record
                                        a line, each with the `index` of the input row it belongs to

Every input row that was processed has all of its records (one or several, kept or skipped) in exactly one
chunk, so a restarted run reads the chunks, processes only the rows with no record and appends new chunks;
a row in two chunk files is an error. Process p of P takes rows p::P (`my_rows`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from mm.config import ConfigError
from mm.data.skips import DataError
from mm.paths import write_atomic


def my_rows(total: int, process: int, processes: int) -> range:
    return range(process, total, processes)


def barrier(name: str) -> None:
    """All processes reach this point (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RowChunks:
    """The chunk files of `prefix` in `out_dir`, made or checked against `meta` (its `keys` must match)."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, meta: dict[str, Any], keys: Sequence[str]):
        self.out, self.prefix = Path(out_dir), prefix
        self.pattern = re.compile(rf"^{re.escape(prefix)}-p(\d+)-(\d{{5}})\.jsonl$")
        f = self.out / "meta.json"
        if f.exists():
            old = json.loads(f.read_text())
            diff = [k for k in keys if old.get(k) != meta.get(k)]
            if diff:
                what = ", ".join(f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in diff)
                raise ConfigError(f"{self.out}: holds the output of another run ({what}); use a new output directory")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(f, json.dumps(meta, indent=1) + "\n")

    def records(self) -> dict[int, list[dict[str, Any]]]:
        """Every record of every chunk, grouped by row index (in chunk order)."""
        out: dict[int, list[dict[str, Any]]] = {}
        where: dict[int, str] = {}
        for f in sorted(glob.glob(str(self.out / f"{self.prefix}-p*-*.jsonl"))):
            if not self.pattern.match(os.path.basename(f)):
                continue
            with open(f, encoding="utf-8") as fh:
                for k, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f} line {k + 1}: not JSON ({e})") from e
                    i = int(rec["index"])
                    if where.setdefault(i, f) != f:
                        raise DataError(f"row {i} ({rec.get('id')}) has records in {where[i]} and {f}")
                    out.setdefault(i, []).append(rec)
        return out

    def next_chunk(self, process: int) -> int:
        nums = [int(m.group(2)) for f in os.listdir(self.out)
                if (m := self.pattern.match(f)) and int(m.group(1)) == process]
        return max(nums, default=-1) + 1

    def write(self, process: int, records: Iterable[dict[str, Any]]) -> Path:
        """`records` (every record of the rows they belong to) as this process's next chunk."""
        path = self.out / f"{self.prefix}-p{process}-{self.next_chunk(process):05d}.jsonl"
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["index"])))
        return path
