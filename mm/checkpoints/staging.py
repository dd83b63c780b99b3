"""The nothing-partial guarantee of every directory mm writes (conversions, exports, soups, PEFT adapters).

`staged_output(dst, overwrite)` yields a fresh hidden directory next to `dst`; it is renamed into place only
when the block finishes, so an interrupted or failed write never leaves a partial `dst` and never damages an
existing one (replaced only after the new one is complete, and only with `overwrite`).
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from mm.checkpoints.errors import ConversionError


def refuse_existing(dst: str | Path, overwrite: bool) -> None:
    if Path(dst).exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_output(dst: str | Path, overwrite: bool) -> Iterator[Path]:
    """A fresh staging directory that becomes `dst` on success and disappears on failure."""
    dst = Path(dst).absolute()
    refuse_existing(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.parent / f".{dst.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            stage.rename(dst)
            shutil.rmtree(old)
        else:
            stage.rename(dst)
    finally:
        if stage.exists():  # failure: never leave a partial output (cleanup errors must not mask the cause)
            shutil.rmtree(stage, ignore_errors=True)
