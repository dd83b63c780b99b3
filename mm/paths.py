"""Paths a run reads and writes: local paths and object-store URIs (`gs://`, `s3://`) alike, through `etils.epath`.

Every workdir, checkpoint, data file and export path of mm goes through `as_path`, so a URI works wherever its
filesystem is installed (`gcsfs` for `gs://`, `s3fs` for `s3://`); Orbax and TensorStore write checkpoints to
it directly. A few writers only write local files or append to them (TensorBoard's event writer, the
`jax.profiler` trace, `metrics.jsonl`, exporters that rename into place); they write into a `Mirror`: the
directory itself when it is local, for a URI a local directory whose new and changed files `sync()` copies up.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (`scheme://...`), which `pathlib` cannot open."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute; a URI as it is."""
    return epath.Path(path) if is_remote(path) else epath.Path(Path(path).absolute())


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Readers see the old file or the new one, never a part: local files are renamed into place; an object
    store's single-object write is already all-or-nothing."""
    p = as_path(path)
    if is_remote(p):
        p.write_text(text)
        return
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """One file from anywhere to anywhere (local paths or URIs), parent directories made."""
    out = as_path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(as_path(src).read_bytes())


def upload_tree(src: str | os.PathLike, dst: str | os.PathLike, last: Iterable[str] = ()) -> list[str]:
    """Copies the files of the local directory `src` to `dst` (a URI or a local path); the relative names in
    `last` go after every other file, so a reader that checks for them (a manifest) never sees a part. Returns
    the relative names in the order they were written."""
    src = Path(src)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    late = set(last)
    order = [f for f in files if f not in late] + [f for f in files if f in late]
    for rel in order:
        copy_file(src / rel, as_path(dst) / rel)
    return order


def _files(root: epath.Path, prefix: str = "") -> list[tuple[str, epath.Path]]:
    """(relative name, path) of every file under `root`, one listing per directory (object stores refuse `**`)."""
    out = []
    for p in sorted(root.iterdir(), key=lambda x: x.name):
        if p.is_dir():
            out += _files(p, f"{prefix}{p.name}/")
        else:
            out.append((prefix + p.name, p))
    return out


_COPIES: dict[str, Path] = {}


def local_copy(path: str | os.PathLike) -> Path:
    """`path` as a local file or directory, for readers that only open local files (safetensors' memory map,
    tokenizers): a local path as it is; a URI's file or tree downloaded once per process into a temporary
    directory (removed at exit)."""
    if not is_remote(path):
        return Path(path)
    key = os.fspath(path)
    if key not in _COPIES:
        src = as_path(key)
        if not src.exists():
            raise FileNotFoundError(f"{key}: no such file or directory")
        tmp = Path(tempfile.mkdtemp(prefix="mm-copy-"))
        atexit.register(shutil.rmtree, tmp, True)
        dst = tmp / (src.name or "root")
        if src.is_dir():
            for rel, p in _files(src):
                copy_file(p, dst / rel)
        else:
            copy_file(src, dst)
        _COPIES[key] = dst
    return _COPIES[key]


class Mirror:
    """A local directory that stands for `target`. Local target: the directory itself (`sync` does nothing).
    URI: a temporary directory, seeded with the `pull` files (relative names) the target already holds - so
    appending to `metrics.jsonl` continues a resumed run's file - whose new or changed files `sync()` uploads,
    and `close()` uploads and removes."""

    def __init__(self, target: str | os.PathLike, pull: Iterable[str] = ()):
        self.target = as_path(target)
        self.remote = is_remote(self.target)
        self._seen: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = Path(os.fspath(self.target))
            self.local.mkdir(parents=True, exist_ok=True)
            return
        self.local = Path(tempfile.mkdtemp(prefix="mm-mirror-"))
        for name in pull:
            if (self.target / name).exists():
                copy_file(self.target / name, self.local / name)
                self._seen[name] = self._stamp(self.local / name)

    @staticmethod
    def _stamp(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns

    def sync(self) -> list[str]:
        """Uploads every file written or changed since the last sync; returns their relative names."""
        if not self.remote:
            return []
        sent = []
        for root, _, files in os.walk(self.local):
            for f in sorted(files):
                p = Path(root) / f
                rel = p.relative_to(self.local).as_posix()
                stamp = self._stamp(p)
                if self._seen.get(rel) == stamp:
                    continue
                copy_file(p, self.target / rel)
                self._seen[rel] = stamp
                sent.append(rel)
        return sent

    def close(self) -> None:
        if self.remote and self.local.exists():
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)
