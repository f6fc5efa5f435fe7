"""What a run's results are computed from, pinned by content: `_job.json` records a fingerprint of
every input file, model file and adapter file, and a resume whose fingerprints differ is refused,
naming what changed (a file replaced at the same path would otherwise give a mix of old and new rows).

A fingerprint is cheap and changes whenever the content does:

    local file up to HASH_LIMIT bytes   sha256 of its content (configs, tokenizers, LoRA weights),
                                        computed once per version of the file (a node's digest cache)
    larger local file                   size and modification time in ns (base-model weights)
    S3 object                           size and ETag (S3 derives the ETag from the content)

Input files are pinned by size and modification time (local) or size and ETag (S3), never read
whole: an input can be terabytes. The pins are checked again where the files are read: every
actor checks the local model and adapter files against them at each read
(`actors.fingerprint.read_pinned`), and a node's copy of an s3:// model or pool is made only from
a bucket listing equal to them (`fetch.local_copy(..., pins=)`). `_calibration.json` is pinned by
its sha256 (`digest`), and a committed run's input is compared with its pins before "nothing to
do" is said (`input_changes`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from actors.fingerprint import HASH_LIMIT  # noqa: F401 (the pins' rule)
from actors.fingerprint import fingerprint as _local, use_digests
from pipeline import storage
from pipeline.fetch import cache_root
from pipeline.config import JobConfig
from pipeline.inputs import InputFile, list_files


def digest(data: bytes) -> str:
    """The pin of a small record the run stores itself (`_calibration.json`)."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def tree(uri: str, config: JobConfig) -> dict[str, str]:
    """Relative file name -> fingerprint for every file below a directory or prefix ({} if none):
    an object's from the listing (size, ETag: nothing read), a local file's digest from the cache
    of digests while the file is unchanged (`actors.fingerprint.Digests`)."""
    if storage.is_s3(uri):
        return {o.key: f"size:{o.size},etag:{o.etag}" for o in storage.list_objects(uri, config.storage)}
    use_digests(cache_root(config.storage))
    root = Path(uri).expanduser()
    if root.is_file():
        return {root.name: _local(root, True)}
    return {o.key: _local(root / o.key, True) for o in storage.list_objects(uri, config.storage)}


def input_pins(files: list[InputFile] | list[tuple[str, str]], config: JobConfig) -> dict[str, str]:
    """Input file name (relative to `input.uri`) -> size and modification time or ETag; `files` are
    `InputFile`s or (name, URI) pairs."""
    named = [(f.name, f.uri) if isinstance(f, InputFile) else f for f in files]
    if not named:
        return {}
    if storage.is_s3(config.input.uri):
        listed = {o.key: o for o in storage.list_objects(config.input.uri, config.storage)}
        out = {}
        for name, uri in named:
            obj = listed.get(name) or storage.object_info(uri, config.storage)
            out[name] = f"size:{obj.size},etag:{obj.etag}" if obj else "missing"
        return out
    return {name: _local(Path(uri).expanduser(), False) if os.path.exists(os.path.expanduser(uri))
            else "missing" for name, uri in named}


def input_changes(recorded: dict, config: JobConfig) -> list[str]:
    """What differs between the input pinned in a `_job.json` (`recorded`) and the input now, from a
    listing alone (no file is opened); [] if nothing."""
    try:
        now = input_pins([(rel, uri) for _, rel, uri in list_files(config.input, config.storage)], config)
    except Exception as err:  # noqa: BLE001 - an input that cannot be listed has changed too
        return [f"the input cannot be listed now ({type(err).__name__}: {err})"]
    return changes({"input": recorded.get("input", {})}, {"input": now})


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
