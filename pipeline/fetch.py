"""Download an `s3://` model or adapter prefix once per node into a local cache, verified.

Actors on one node share the cache: a file lock makes the first one download while the others
wait. A copy's directory is named by the prefix and by a digest of its bucket listing (key, size,
ETag of every object), and never changes once written: a bucket that changed gets a new
directory beside the old one, so a job reading a copy never sees it replaced under it (by
another job, or by `logo-batch validate`). With `pins` (a job's `_job.json`), a listing that
differs from them is refused before anything is downloaded, naming the object. Every downloaded file is checked
against its listed size, and against its MD5 where the ETag is one: not for multipart uploads
(an ETag with a '-') nor for objects encrypted with SSE-KMS or a customer key (SSE-C), whose
ETags are not MD5s; those are checked by size. A download goes to a temporary directory that is
renamed into place only when complete, so a crash never leaves a half copy in use.

Keys are names chosen by whoever writes the bucket: a key that would land outside the cache
directory (`pool/../../x`, an absolute path) is refused before anything is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import botocore.exceptions

from actors.fingerprint import use_digests
from pipeline import storage
from pipeline.config import StorageConfig

LISTING = ".logo-batch-listing.json"
DOWNLOADS = ".downloads"
"""Suffix of the file beside a cached copy that gets one line per download of it on this node."""


class FetchError(RuntimeError):
    """A remote model or adapter prefix could not be downloaded intact."""


def cache_root(config: StorageConfig) -> Path:
    root = config.cache_dir or os.environ.get("LOGO_BATCH_CACHE") or "~/.cache/logo-batch"
    return Path(root).expanduser()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(uri: str, config: StorageConfig, pins: dict[str, str] | None = None) -> str:
    """A local path holding the content of `uri`: `uri` itself if local, else a verified cache copy.

    `uri` may name one object (a calibration file) or a prefix (a model or adapter directory).
    `pins` (relative key -> `size:..,etag:..`, as `pipeline.pins.tree` records them) must equal the
    bucket's listing now, else `ChangedFileError` names the first object that differs.
    """
    if not storage.is_s3(uri):
        return uri
    tag = hashlib.sha256(f"{storage.endpoint_url(config)}|{uri}".encode()).hexdigest()[:16]
    single = storage.object_info(uri, config)
    if single is not None:  # one object: cache its parent listing entry only
        uri, objects = uri.rsplit("/", 1)[0], [single]
    else:
        objects = storage.list_objects(uri, config)
        if not objects:
            raise FetchError(f"{uri}: no objects there; check the URI and the storage endpoint")
    objects = [o for o in objects if not (o.key.endswith("/") and o.size == 0)]  # "folder" markers
    listing = [{"key": o.key, "size": o.size, "etag": o.etag} for o in objects]
    if pins is not None:
        _check_pins(uri, listing, pins)
    root = cache_root(config)
    version = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    target = root / f"{tag}-{version}"
    for o in objects:
        cache_path(target, o.key, uri)  # refuse hostile keys before anything is written
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _cached(target, listing):
                _download(uri, listing, target, config)
                with open(root / f"{tag}{DOWNLOADS}", "a") as record:  # one line per download, for operators
                    record.write(f"{uri} pid {os.getpid()}\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target / objects[0].key) if single is not None else str(target)


def pinned_sources(model: str, adapters: str, config: StorageConfig,
                   pins: dict | None) -> tuple[str, str, dict | None]:
    """(local model, local pool, the pins an actor checks its reads against) for a model and a pool
    as a job's `contents` pinned them: an s3:// one is copied only from a listing equal to its pins
    (and then needs no check per read), a local one is checked by the actor at every read (its
    digests cached on the node, `actors.fingerprint.Digests`)."""
    use_digests(cache_root(config))
    sources = {"model": model, "adapters": adapters}
    local = {what: local_copy(uri, config, None if pins is None else pins[what]) for what, uri in sources.items()}
    actor_pins = None if pins is None else {what: pins[what] for what, uri in sources.items()
                                            if not storage.is_s3(uri)}
    return local["model"], local["adapters"], actor_pins


def _check_pins(uri: str, listing: list[dict], pins: dict[str, str]) -> None:
    from actors.fingerprint import ChangedFileError

    now = {item["key"]: f"size:{item['size']},etag:{item['etag']}" for item in listing}
    for key in sorted(set(now) | set(pins)):
        if now.get(key) != pins.get(key):
            state = ("was added" if key not in pins else "was removed" if key not in now
                     else f"changed ({pins[key]} -> {now[key]})")
            raise ChangedFileError(f"{uri}/{key} {state} since the run started; the run stops so that it never "
                                   "mixes two versions: restore the objects, or rerun with --overwrite to start "
                                   "again with the new ones")


def cache_path(root: Path, key: str, uri: str) -> Path:
    """Where object `key` (relative to `uri`) is stored under `root`; a key that would leave `root`
    (a '..' or empty part, an absolute path, a NUL) is refused."""
    parts = key.split("/")
    if not key or "\0" in key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FetchError(f"{uri}: object key {key!r} has an empty, '.' or '..' path part, so it would be written "
                         "outside the local cache; remove or rename that object in the bucket")
    return root.joinpath(*parts)


def _cached(target: Path, listing: list[dict]) -> bool:
    marker = target / LISTING
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == listing
    except ValueError:
        return False


def _download(uri: str, listing: list[dict], target: Path, config: StorageConfig) -> None:
    bucket, prefix = storage.split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = storage.s3_client(config)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for item in listing:
            dest = cache_path(tmp, item["key"], uri)
            dest.parent.mkdir(parents=True, exist_ok=True)
            key = prefix + item["key"]
            try:
                client.download_file(bucket, key, str(dest))
            except botocore.exceptions.ClientError as err:
                status = err.response.get("Error", {}).get("Code")
                hint = (" (an object encrypted with a customer key, SSE-C, cannot be read without it; store it with "
                        "SSE-S3 or SSE-KMS)" if status in ("400", "BadRequest") else "")
                raise FetchError(f"{uri}/{item['key']}: download failed: {err}{hint}") from None
            _verify(dest, item, uri, lambda: client.head_object(Bucket=bucket, Key=key))
        (tmp / LISTING).write_text(json.dumps(listing))
        if target.exists():  # no complete copy (else it was used): never one a reader was handed
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def etag_is_md5(head: dict) -> bool:
    """Whether a single-part object's ETag is the MD5 of its content: not with SSE-KMS (or its dual-layer
    form) nor with a customer key (SSE-C). `head` is a HeadObject reply."""
    return not (str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or head.get("SSECustomerAlgorithm"))


def _verify(path: Path, item: dict, uri: str, head: Callable[[], dict] = lambda: {}) -> None:
    """Check a download against its listing: its size, and its MD5 where the ETag is one. `head` fetches
    the object's metadata (default: none, so the ETag is taken for an MD5); it is called only when the
    MD5 differs, to see whether the ETag is an MD5 at all."""
    size = path.stat().st_size
    if size != item["size"]:
        raise FetchError(f"{uri}/{item['key']}: downloaded {size} bytes, the bucket lists {item['size']}; retry")
    etag = item["etag"] or ""
    if etag and "-" not in etag and _md5(path) != etag and etag_is_md5(head()):
        raise FetchError(f"{uri}/{item['key']}: MD5 of the download differs from the object's ETag {etag}; retry")
