"""File fingerprints: what a job pins its model and adapter files by, and the check at every read.

    local file up to HASH_LIMIT bytes   sha256 of its content (configs, tokenizers, LoRA weights)
    larger local file                   size and modification time in ns (base-model weights)

A job records these in its `_job.json` before any work (`pipeline.pins`) and hands them to every
actor, which checks each model and adapter file against them when it reads it: at start-up and
at every later read of an adapter that residency evicted. A file replaced in the middle of a run
stops the run naming it, before any row uses it, so one run never mixes two versions of a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

HASH_LIMIT = 64 << 20
"""Local files up to this size are pinned by a sha256 of their content; larger ones by size and mtime."""

T = TypeVar("T")


class ChangedFileError(RuntimeError):
    """A pinned model or adapter file differs from its pin: the run stops (fatal, never a row error)."""


def fingerprint(path: Path, digest: bool = True) -> str:
    """`sha256:<hex>` of a file up to HASH_LIMIT bytes (with `digest`), else its size and mtime."""
    st = path.stat()
    if digest and st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"
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


