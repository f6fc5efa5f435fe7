"""What a run's results are computed from, pinned by content: `_job.json` records a fingerprint of
every input file, model file and adapter file, and a resume whose fingerprints differ is refused,
naming what changed (a file replaced at the same path would otherwise give a mix of old and new rows).

A fingerprint is cheap and changes whenever the content does:

    local file up to HASH_LIMIT bytes   sha256 of its content (configs, tokenizers, LoRA weights)
    larger local file                   size and modification time in ns (base-model weights)
    S3 object                           size and ETag (S3 derives the ETag from the content)

Input files are pinned by size and modification time (local) or size and ETag (S3), never read
whole: an input can be terabytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.inputs import InputFile

HASH_LIMIT = 64 << 20
"""Local files up to this size are pinned by a sha256 of their content; larger ones by size and mtime."""


def _local(path: Path, digest: bool) -> str:
    st = path.stat()
    if digest and st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def tree(uri: str, config: JobConfig) -> dict[str, str]:
    """Relative file name -> fingerprint for every file below a directory or prefix ({} if none)."""
    if storage.is_s3(uri):
        return {o.key: f"size:{o.size},etag:{o.etag}" for o in storage.list_objects(uri, config.storage)}
    root = Path(uri).expanduser()
    if root.is_file():
        return {root.name: _local(root, True)}
    return {o.key: _local(root / o.key, True) for o in storage.list_objects(uri, config.storage)}


def input_pins(files: list[InputFile], config: JobConfig) -> dict[str, str]:
    """Input file name (relative to `input.uri`) -> size and modification time or ETag."""
    if not files:
        return {}
    if storage.is_s3(config.input.uri):
        listed = {o.key: o for o in storage.list_objects(config.input.uri, config.storage)}
        out = {}
        for f in files:
            obj = listed.get(f.name) or storage.object_info(f.uri, config.storage)
            out[f.name] = f"size:{obj.size},etag:{obj.etag}" if obj else "missing"
        return out
    return {f.name: _local(Path(f.uri).expanduser(), False) if os.path.exists(os.path.expanduser(f.uri))
            else "missing" for f in files}


def pins(config: JobConfig, files: list[InputFile]) -> dict[str, dict[str, str]]:
    """The fingerprints recorded in `_job.json` under `contents`."""
    return {"input": input_pins(files, config), "model": tree(config.model.path, config),
            "adapters": tree(config.adapters.path, config)}


WHAT = {"input": "input file", "model": "model file", "adapters": "adapter file"}


def changes(recorded: dict, now: dict, limit: int = 5) -> list[str]:
    """What differs between two `pins` records, as phrases naming each file ([] if nothing)."""
    out = []
    for section, label in WHAT.items():
        old, new = recorded.get(section, {}), now.get(section, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                out.append(f"{label} {name} was removed")
            elif name not in old:
                out.append(f"{label} {name} was added")
            elif old[name] != new[name]:
                out.append(f"{label} {name} changed ({old[name]} -> {new[name]})")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out
