"""File fingerprints: what a job pins its model and adapter files by, and the check at every read.

    local file up to HASH_LIMIT bytes   sha256 of its content (configs, tokenizers, LoRA weights)
    larger local file                   size and modification time in ns (base-model weights)

A job records these in its `_job.json` before any work (`pipeline.pins`) and hands them to every
actor, which checks each model and adapter file against them when it reads it: at start-up and
at every later read of an adapter that residency evicted. A file replaced in the middle of a run
stops the run naming it, before any row uses it, so one run never mixes two versions of a file.

A digest is computed once per version of a file (`Digests`, a small SQLite table in the node's
cache directory): keyed by the path, its inode, size, modification and change times, it is
reused while all of them are unchanged, so a resume over a pool of 1,000 adapters hashes no file
again. Writing a file changes its change time (which `touch` cannot set back), so a file changed
in place is hashed again; an entry made within `RACY_NS` of the file's last change is not trusted
(a write in the same clock tick as the hash would keep the times).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

HASH_LIMIT = 64 << 20
"""Local files up to this size are pinned by a sha256 of their content; larger ones by size and mtime."""

T = TypeVar("T")


class ChangedFileError(RuntimeError):
    """A pinned model or adapter file differs from its pin: the run stops (fatal, never a row error)."""


RACY_NS = 2_000_000_000
"""A cached digest made less than this after the file's last change is computed again."""


class Digests:
    """sha256 digests of local files by (path, inode, size, mtime, ctime), kept in `root/digests.sqlite3`.
    Shared by the processes of a node (SQLite's locking); a cache that cannot be used is skipped."""

    def __init__(self, root: Path | str):
        self.path = Path(root).expanduser() / "digests.sqlite3"
        self.hashed = 0
        """Files this process hashed (cache misses)."""
        self._open: tuple[int, sqlite3.Connection] | None = None

    def _db(self) -> sqlite3.Connection:
        if self._open is None or self._open[0] != os.getpid():  # a connection is never shared with a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stamp TEXT, hashed_ns INTEGER, "
                       "digest TEXT)")
            self._open = (os.getpid(), db)
        return self._open[1]

    def digest(self, path: Path, st: os.stat_result) -> str:
        key, stamp = str(Path(path).absolute()), f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        changed = max(st.st_mtime_ns, st.st_ctime_ns)
        try:
            with self._db() as db:
                row = db.execute("SELECT stamp, hashed_ns, digest FROM digests WHERE path = ?", (key,)).fetchone()
        except sqlite3.Error:
            row = None
        if row is not None and row[0] == stamp and row[1] - changed > RACY_NS:
            return row[2]
        hashed_ns, value = time.time_ns(), _sha256(path)
        self.hashed += 1
        try:
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (key, stamp, hashed_ns, value))
        except sqlite3.Error:
            pass
        return value


_digests: Digests | None = None


def use_digests(root: Path | str | None) -> Digests | None:
    """Cache digests under `root` in this process from now on (None: no cache); returns the cache."""
    global _digests
    _digests = None if root is None else Digests(root)
    return _digests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def fingerprint(path: Path, digest: bool = True) -> str:
    """`sha256:<hex>` of a file up to HASH_LIMIT bytes (with `digest`; from the digest cache while
    the file is unchanged, see `use_digests`), else its size and mtime."""
    st = path.stat()
    if digest and st.st_size <= HASH_LIMIT:
        return _digests.digest(path, st) if _digests is not None else _sha256(path)
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_pinned(files: Mapping[str, Path], pins: Mapping[str, str] | None, read: Callable[[], T],
                what: str) -> T:
    """`read()`, with each of `files` (pin key -> path) checked against `pins` first and seen
    unchanged (inode, size, mtime) after; `pins` None reads unchecked. Raises `ChangedFileError`
    naming the file and its two fingerprints."""
    if pins is None:
        return read()
    before = {}
    for key, path in files.items():
        if key not in pins:
            raise ChangedFileError(f"{what} file {path} was not there when the run started (it has no pin in "
                                   "_job.json); keep the model and adapter files unchanged while a job runs, or "
                                   "rerun with --overwrite to start again with the new files")
        try:
            before[key], now = _stamp(path), fingerprint(path)
        except FileNotFoundError:
            raise ChangedFileError(f"{what} file {path} was removed since the run started; restore it, or rerun "
                                   "with --overwrite to start again") from None
        if now != pins[key]:
            raise ChangedFileError(f"{what} file {path} changed since the run started ({pins[key]} -> {now}); the "
                                   "run stops so that it never mixes two versions: restore the file, or rerun with "
                                   "--overwrite to start again with the new one")
    value = read()
    for key, path in files.items():
        if _stamp(path) != before[key]:
            raise ChangedFileError(f"{what} file {path} changed while it was read; the run stops so that it never "
                                   "mixes two versions: keep the files unchanged while a job runs")
    return value


def tree_files(root: Path) -> dict[str, Path]:
    """Relative name (with '/') -> path of every file below `root` (or `root` itself if a file)."""
    if root.is_file():
        return {root.name: root}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def check_names(root: Path, pins: Mapping[str, str], what: str) -> None:
    """The files below `root` are exactly the pinned ones (an added or removed file changes the run)."""
    names = set(tree_files(root))
    added, removed = sorted(names - set(pins)), sorted(set(pins) - names)
    if added or removed:
        change = (f"{root / added[0]} was added" if added else f"{root / removed[0]} was removed")
        raise ChangedFileError(f"{what}: {change} since the run started ({len(added)} added, {len(removed)} removed "
                               "in all); restore the files, or rerun with --overwrite to start again")


def under(pins: Mapping[str, str] | None, prefix: str) -> dict[str, str] | None:
    """The pins of the files below `prefix/`, relative to it (None stays None)."""
    if pins is None:
        return None
    start = prefix.rstrip("/") + "/"
    return {key[len(start):]: value for key, value in pins.items() if key.startswith(start)}


