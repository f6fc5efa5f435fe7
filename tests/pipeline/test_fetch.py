"""Downloading s3:// models and adapters into the node cache, verified and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import StorageConfig
from actors.fingerprint import ChangedFileError
from pipeline import storage
from pipeline.fetch import FetchError, _verify, cache_path, local_copy


def test_prefix_is_downloaded_once_verified_and_refreshed_when_it_changes(s3_server, tmp_path):
    cfg = StorageConfig(endpoint=s3_server.endpoint, cache_dir=str(tmp_path / "cache"))
    client = s3_server.client()
    for key, body in {"pool/a/adapter_config.json": b"{}", "pool/a/w.bin": b"x" * 1000, "pool/b/w.bin": b"y"}.items():
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=body)
    uri = f"s3://{s3_server.bucket}/pool"
    local = local_copy(uri, cfg)
    root = Path(local)
    assert (tmp_path / "cache") in root.parents
    assert (root / "a" / "w.bin").read_bytes() == b"x" * 1000 and (root / "b" / "w.bin").read_bytes() == b"y"
    stamp = (root / "a" / "w.bin").stat().st_mtime_ns
    assert local_copy(uri, cfg) == local and (root / "a" / "w.bin").stat().st_mtime_ns == stamp  # cache hit

    pinned = {o.key: f"size:{o.size},etag:{o.etag}" for o in storage.list_objects(uri, cfg)}
    assert local_copy(uri, cfg, pins=pinned) == local  # the listing equals the pins: the same copy
    client.put_object(Bucket=s3_server.bucket, Key="pool/b/w.bin", Body=b"changed")
    changed = local_copy(uri, cfg)
    assert changed != local and (Path(changed) / "b" / "w.bin").read_bytes() == b"changed"  # a new directory
    assert (root / "b" / "w.bin").read_bytes() == b"y"  # the copy a running job reads never changes
    with pytest.raises(ChangedFileError, match=r"pool/b/w.bin changed \(size:1,etag:.* -> size:7,etag:.*\) since "
                                               "the run started"):
        local_copy(uri, cfg, pins=pinned)

    single = local_copy(f"s3://{s3_server.bucket}/pool/a/adapter_config.json", cfg)
    assert Path(single).read_bytes() == b"{}"
    assert (Path(changed) / "b" / "w.bin").read_bytes() == b"changed"  # the prefix's copy is left alone
    with pytest.raises(FetchError, match="no objects there"):
        local_copy(f"s3://{s3_server.bucket}/nothing-here", cfg)
    assert local_copy(str(tmp_path), cfg) == str(tmp_path)  # local paths are used in place


def test_verification_catches_size_and_md5_mismatches(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    _verify(path, {"key": "w.bin", "size": 3, "etag": "900150983cd24fb0d6963f7d28e17f72"}, "s3://b/p")
    _verify(path, {"key": "w.bin", "size": 3, "etag": "ffff-2"}, "s3://b/p")  # multipart: size only
    with pytest.raises(FetchError, match=r"downloaded 3 bytes, the bucket lists 4"):
        _verify(path, {"key": "w.bin", "size": 4, "etag": None}, "s3://b/p")
    with pytest.raises(FetchError, match="MD5 of the download differs"):
        _verify(path, {"key": "w.bin", "size": 3, "etag": "00000000000000000000000000000000"}, "s3://b/p")


def test_encrypted_objects_are_checked_by_size_not_md5(tmp_path):
    # SSE-KMS and SSE-C ETags are not MD5s (AWS documents this); SeaweedFS returns MD5s for them, so the
    # decision is held to AWS's HeadObject replies here.
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    item = {"key": "w.bin", "size": 3, "etag": "7a9f2c1e0b8d4f63a5e2c9d1b0f4e8a7"}
    _verify(path, item, "s3://b/p", lambda: {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:aws:kms:k"})
    _verify(path, item, "s3://b/p", lambda: {"ServerSideEncryption": "aws:kms:dsse"})
    _verify(path, item, "s3://b/p", lambda: {"SSECustomerAlgorithm": "AES256"})
    for plain in ({}, {"ServerSideEncryption": "AES256"}):  # SSE-S3 and unencrypted ETags are MD5s
        with pytest.raises(FetchError, match="MD5 of the download differs"):
            _verify(path, item, "s3://b/p", lambda: plain)
    assert _verify(path, {**item, "etag": "900150983cd24fb0d6963f7d28e17f72"}, "s3://b/p",
                   lambda: pytest.fail("HeadObject is asked only when the MD5 differs")) is None


@pytest.mark.parametrize("key", ["pool/../../x", "../x", "/etc/x", "a//b", "a/./b", "a/..", "..", "a/b\0c"])
def test_keys_that_would_leave_the_cache_are_refused(tmp_path, key):
    # SeaweedFS refuses such keys at upload (S3 itself accepts them), so the check is held to its function.
    with pytest.raises(FetchError, match=r"s3://b/pool: object key .* would be written outside the local cache"):
        cache_path(tmp_path, key, "s3://b/pool")


def test_nested_keys_stay_below_the_cache(tmp_path):
    assert cache_path(tmp_path, "a/b/c.json", "s3://b/p") == tmp_path / "a" / "b" / "c.json"
    assert cache_path(tmp_path, "a..b/c", "s3://b/p") == tmp_path / "a..b" / "c"  # dots inside a name are fine
