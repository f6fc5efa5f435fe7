"""Object-storage access: URIs, pyarrow file systems, and the few boto3 operations we need.

A location is a local path or an `s3://bucket/key` URI. pyarrow file systems read and write the
Parquet data (local or S3); boto3 does what pyarrow does not do well: writing a small object only
if it is absent (the commit marker and the job record), and listing objects with their ETags.
Endpoint and region come from `StorageConfig` or the usual AWS environment variables;
credentials only from the environment (or the node's role).

A request refused for its credentials (wrong, missing, expired) or for a bucket that does not exist
raises one `ConfigError` line naming the URI, the credential variables and `storage.endpoint`
(`access`), from boto3 and pyarrow alike, wherever a run makes its first request.

Transient failures (connection refused or reset, timeouts, throttling, 5xx) are retried by the
clients themselves with exponential backoff: boto3's `standard` retry mode and pyarrow's
`AwsStandardS3RetryStrategy`, each with `StorageConfig.retries` attempts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.config import ConfigError, StorageConfig


CONNECT_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 120


AUTH_CODES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken",
              "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity")
"""S3 error codes (boto3's spelling) of a request refused for its credentials."""
CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"


def _arrow_code(code: str) -> str:
    return "".join(part.capitalize() for part in code.split("_"))


def access_error(uri: str, err: BaseException, storage: StorageConfig) -> ConfigError | None:
    """The one-line error for an S3 request refused for its credentials or bucket, else None."""
    import botocore.exceptions

    where = f"{endpoint_url(storage)} (storage.endpoint)" if endpoint_url(storage) else \
        "AWS (no storage.endpoint or AWS_ENDPOINT_URL is set)"
    if isinstance(err, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return ConfigError(f"{uri}: no S3 credentials found ({err}); set {CREDENTIALS} in the environment, or give "
                           f"the node a role, for the service at {where}")
    code = None
    if isinstance(err, botocore.exceptions.ClientError):
        code = err.response.get("Error", {}).get("Code")
    elif isinstance(err, OSError) and "AWS Error " in str(err):  # pyarrow: "AWS Error ACCESS_DENIED during ..."
        code = _arrow_code(str(err).split("AWS Error ", 1)[1].split(" ", 1)[0])
    if code == "NoSuchBucket":
        return ConfigError(f"{uri}: the S3 service at {where} has no bucket {split_s3(uri)[0]!r}; check the URI and "
                           "storage.endpoint")
    if code in AUTH_CODES:
        return ConfigError(f"{uri}: the S3 service at {where} refused the request ({code}); check {CREDENTIALS} "
                           "and their permissions on the bucket, and that storage.endpoint names the service "
                           "they belong to")
    return None


@contextlib.contextmanager
def access(uri: str, storage: StorageConfig):
    """Requests inside raise `access_error`'s one line when refused for credentials or a bucket."""
    try:
        yield
    except Exception as err:
        translated = access_error(uri, err, storage) if is_s3(uri) else None
        if translated is None:
            raise
        raise translated from None


def _access_checked(function):
    """`function(uri, ..., storage)` inside `access(uri, storage)`."""
    @functools.wraps(function)
    def checked(uri: str, *args, **kwargs):
        cfg = next((a for a in (*args, *kwargs.values()) if isinstance(a, StorageConfig)), StorageConfig())
        with access(uri, cfg):
            return function(uri, *args, **kwargs)
    return checked


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{uri!r}: not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI with single slashes."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normal_uri(uri: str) -> str:
    """The place a URI names, for comparing two of them: a local path with every symlink and `..`
    resolved (also below a part that does not exist yet); an S3 key with `.`, `..` and repeated
    slashes collapsed, as the path-style clients that build keys from paths do. No trailing slash."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"s3://{bucket}/{key}".rstrip("/")
    return os.path.realpath(Path(uri).expanduser()).rstrip("/") or "/"


def endpoint_url(storage: StorageConfig) -> str | None:
    return storage.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region(storage: StorageConfig) -> str:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def filesystem(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow file system for `uri` and the path to use with it."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    bucket, key = split_s3(uri)
    kwargs: dict = {"region": region(storage)}
    endpoint = endpoint_url(storage)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    kwargs.update(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=storage.retries),
                  connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def s3_client(storage: StorageConfig):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": storage.retries},
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S)
    return boto3.client("s3", endpoint_url=endpoint_url(storage), region_name=region(storage), config=config)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Path relative to the listed prefix, with '/' separators."""
    size: int
    """Size in bytes."""
    etag: str | None
    """The S3 ETag without quotes (None for local files)."""


@_access_checked
def list_objects(uri: str, storage: StorageConfig) -> list[ObjectInfo]:
    """Every object (file) below a prefix or directory, recursively, sorted by key."""
    if not is_s3(uri):
        root = Path(uri).expanduser()
        if not root.is_dir():
            return []
        return sorted((ObjectInfo(p.relative_to(root).as_posix(), p.stat().st_size, None)
                       for p in root.rglob("*") if p.is_file()), key=lambda o: o.key)
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out = []
    pages = s3_client(storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            out.append(ObjectInfo(item["Key"][len(prefix):], int(item["Size"]), item["ETag"].strip('"')))
    return sorted(out, key=lambda o: o.key)


@_access_checked
def object_info(uri: str, storage: StorageConfig) -> ObjectInfo | None:
    """Size and ETag of one S3 object (its key is the base name), or None if there is none."""
    import botocore.exceptions

    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        return None
    try:
        head = s3_client(storage).head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return ObjectInfo(key.rsplit("/", 1)[-1], int(head["ContentLength"]), head["ETag"].strip('"'))


@_access_checked
def read_bytes(uri: str, storage: StorageConfig) -> bytes | None:
    """The content of a small object, or None if it does not exist."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        return path.read_bytes() if path.is_file() else None
    bucket, key = split_s3(uri)
    client = s3_client(storage)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


@_access_checked
def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Create or replace a small object (locally: atomically, through a temporary file)."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    bucket, key = split_s3(uri)
    s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data)


@_access_checked
def write_if_absent(uri: str, data: bytes, storage: StorageConfig) -> bool:
    """Create the object with `data` unless it exists; True if this call created it."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # atomic create-if-absent with complete content
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
    import botocore.exceptions

    bucket, key = split_s3(uri)
    try:
        s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise


@_access_checked
def delete(uri: str, storage: StorageConfig) -> None:
    """Delete one object or file if it exists."""
    if not is_s3(uri):
        Path(uri).expanduser().unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    s3_client(storage).delete_object(Bucket=bucket, Key=key)


@_access_checked
def delete_prefix(uri: str, storage: StorageConfig) -> int:
    """Delete every object below a prefix or directory; returns how many were deleted."""
    objects = list_objects(uri, storage)
    if not is_s3(uri):
        import shutil

        shutil.rmtree(Path(uri).expanduser(), ignore_errors=True)
        return len(objects)
    bucket, prefix = split_s3(uri)
    client = s3_client(storage)
    keys = [f"{prefix.rstrip('/')}/{o.key}" for o in objects]
    for start in range(0, len(keys), 1000):
        chunk = keys[start:start + 1000]
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
    return len(keys)


@_access_checked
def exists(uri: str, storage: StorageConfig) -> bool:
    """True if a file or directory exists at `uri` (local), or any object at or below it (S3)."""
    if not is_s3(uri):
        return Path(uri).expanduser().exists()
    bucket, key = split_s3(uri)
    reply = s3_client(storage).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return bool(reply.get("Contents"))
