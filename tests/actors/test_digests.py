"""Digests of pinned files computed once per version of a file: a resume hashes no adapter file,
and a file changed in place (new size, modification or change time) is still found."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from actors import fingerprint
from actors.fingerprint import ChangedFileError, read_pinned, tree_files, use_digests

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def opened_during(call):
    """(what `call()` returned, the files it opened)."""
    global _opened
    _opened = []
    try:
        return call(), list(_opened)
    finally:
        _opened = None


def _pool(root: Path, n: int = 20) -> Path:
    for i in range(n):
        (root / "pool" / f"a{i}").mkdir(parents=True)
        (root / "pool" / f"a{i}" / "adapter_config.json").write_text('{"r": %d}' % i)
        (root / "pool" / f"a{i}" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return root / "pool"


def _pins(pool: Path) -> dict[str, str]:
    return {key: fingerprint.fingerprint(path) for key, path in tree_files(pool).items()}


@pytest.fixture
def digests(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_NS", 0)  # files made a moment ago count as settled
    yield use_digests(tmp_path / "cache")
    use_digests(None)


def test_a_second_pinning_and_every_later_check_open_no_pinned_file(digests, tmp_path):
    pool = _pool(tmp_path)
    first, opened = opened_during(lambda: _pins(pool))
    assert len([p for p in opened if p.startswith(str(pool))]) == 40 and digests.hashed == 40
    again, opened = opened_during(lambda: _pins(pool))
    assert again == first and not [p for p in opened if p.startswith(str(pool))] and digests.hashed == 40
    files = {f"a3/{name}": pool / "a3" / name for name in ("adapter_config.json", "adapter_model.safetensors")}
    value, opened = opened_during(lambda: read_pinned(files, {k: first[k] for k in files}, lambda: "read", "adapter"))
    assert value == "read" and not opened  # the actor's check at a read: from the cache too
    # another process (a resumed driver) finds the same cache
    assert fingerprint.Digests(tmp_path / "cache").digest(pool / "a3" / "adapter_config.json",
                                                          (pool / "a3" / "adapter_config.json").stat()) \
        == first["a3/adapter_config.json"]


@pytest.mark.parametrize("restore_mtime", [False, True])
def test_a_file_changed_in_place_is_hashed_again_and_refused(digests, tmp_path, restore_mtime):
    pool = _pool(tmp_path, n=2)
    pins = _pins(pool)
    target = pool / "a1" / "adapter_model.safetensors"
    before = target.stat()
    with open(target, "r+b") as f:  # same size, same inode, new bytes
        f.write(os.urandom(16))
    if restore_mtime:  # the modification time set back: the change time still moved
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_ino == before.st_ino
    files = {"a1/adapter_model.safetensors": target}
    with pytest.raises(ChangedFileError, match=r"adapter_model\.safetensors changed since the run started"):
        read_pinned(files, pins, lambda: None, "adapter 'a1'")
    assert digests.hashed == 4 + 1


def test_a_digest_made_in_the_same_moment_as_the_change_is_not_trusted(tmp_path):
    use_digests(tmp_path / "cache")
    try:
        pool = _pool(tmp_path, n=1)
        _pins(pool), _pins(pool)
        assert fingerprint._digests.hashed == 4  # both times: each digest was made within RACY_NS of the write
    finally:
        use_digests(None)
