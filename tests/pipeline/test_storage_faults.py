"""A storage service that goes away for a few seconds: requests ride it out (retries with backoff),
and a whole job on S3 loses nothing and computes every id exactly once."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import StorageConfig
from tests.conftest import TEST_CREDENTIALS, WEED_PORTS, _free_ports, _stop, _weed

OUTAGE_S = 3.0


class RestartableS3:
    """A SeaweedFS server on fixed ports and a fixed data directory, so it can be stopped and started
    again with its objects intact."""

    def __init__(self, root: Path):
        self.root, self.ports = root, dict(zip(WEED_PORTS, _free_ports(len(WEED_PORTS))))
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.endpoint, self.bucket = f"http://127.0.0.1:{self.ports['s3.port']}", "faults"
        self.proc: subprocess.Popen | None = None
        self.outages: list[tuple[float, float]] = []

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            config=Config(retries={"mode": "standard", "max_attempts": 1}))

    def start(self) -> None:
        args = [_weed(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **TEST_CREDENTIALS})
        deadline = time.time() + 60
        while True:
            try:
                client = self.client()
                if self.bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                    client.create_bucket(Bucket=self.bucket)
                client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {(self.root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def outage(self, seconds: float, when=lambda: True, poll: float = 0.05) -> threading.Thread:
        """In the background: wait until `when()` holds, stop the server, wait `seconds`, start it again."""
        self.down = threading.Event()

        def run():
            while not when():
                time.sleep(poll)
            self.stop()
            down = time.time()
            self.down.set()
            time.sleep(seconds)
            self.start()
            self.outages.append((down, time.time()))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def restartable(s3_credentials, tmp_path):
    server = RestartableS3(tmp_path / "weed")
    server.start()
    yield server
    server.stop()


def test_requests_ride_out_a_short_outage(restartable, tmp_path):
    cfg = StorageConfig(endpoint=restartable.endpoint)
    base = f"s3://{restartable.bucket}/ride"
    storage.write_bytes(f"{base}/a.json", b'{"a": 1}', cfg)
    pq.write_table(pa.table({"x": list(range(100))}), tmp_path / "t.parquet")
    restartable.client().upload_file(str(tmp_path / "t.parquet"), restartable.bucket, "ride/t.parquet")

    def read_parquet():
        fs, path = storage.filesystem(f"{base}/t.parquet", cfg)
        return pq.read_table(fs.open_input_file(path)).column("x").to_pylist()

    restartable.stop()
    with pytest.raises(Exception):  # with a single attempt, the outage is an error
        storage.read_bytes(f"{base}/a.json", StorageConfig(endpoint=restartable.endpoint, retries=1))
    thread = restartable.outage(OUTAGE_S)  # already down: back in OUTAGE_S, plus about a second to start
    started = time.time()
    with ThreadPoolExecutor(3) as pool:  # boto3 and pyarrow requests issued while the server is down
        read = pool.submit(storage.read_bytes, f"{base}/a.json", cfg)
        table = pool.submit(read_parquet)
        created = pool.submit(storage.write_if_absent, f"{base}/b.json", b"{}", cfg)
        assert read.result() == b'{"a": 1}'
        assert table.result() == list(range(100))
        assert created.result() is True
    assert time.time() - started > OUTAGE_S, "the requests really waited for the server"
    thread.join()
    assert [o.key for o in storage.list_objects(base, cfg)] == ["a.json", "b.json", "t.parquet"]


@pytest.mark.slow  # a whole job on S3 with an outage in the middle (about a minute here)
def test_job_survives_a_storage_outage_mid_run(ray_runtime, tiny_assets, restartable, tmp_path):
    from pipeline import read_output, run_job
    from tests.pipeline.conftest import SIZES, job, write_prompts

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", SIZES, row_group_size=10)
    client = restartable.client()

    def upload(local: Path, prefix: str) -> str:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), restartable.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{restartable.bucket}/{prefix}"

    output_uri = f"s3://{restartable.bucket}/runs/outage"
    config = job(upload(model, "model"), upload(pool, "pool"), upload(tmp_path / "in", "in"), output_uri,
                 storage={"endpoint": restartable.endpoint, "cache_dir": str(tmp_path / "cache")},
                 resources={"rows_per_block": 10})
    seen_before_outage: list[str] = []

    def data_keys() -> list[str]:
        reply = client.list_objects_v2(Bucket=restartable.bucket, Prefix="runs/outage/data/")
        return [o["Key"] for o in reply.get("Contents", [])]

    def first_file_written() -> bool:
        try:
            keys = data_keys()
        except Exception:
            return False
        seen_before_outage[:] = keys
        return bool(keys)

    thread = restartable.outage(OUTAGE_S, when=first_file_written, poll=0.2)
    try:
        report = run_job(config, progress=False)
        outcome = "rode it out"
    except Exception as err:  # a clear failure is allowed; the rerun must resume it
        outcome = f"failed: {type(err).__name__}: {str(err)[:300]}"
        thread.join()
        report = run_job(config, progress=False)
    thread.join()
    print(f"outage {restartable.outages}; the first run {outcome}")
    assert restartable.outages and seen_before_outage, "the outage happened while data files were being written"
    assert report.status == "committed"
    table = read_output(output_uri, StorageConfig(endpoint=restartable.endpoint))
    ids = table.column("id").to_pylist()
    expected = {f"part-{f}.parquet:{r}" for f, n in enumerate(SIZES) for r in range(n)}
    assert len(ids) == len(set(ids)) == sum(SIZES) and set(ids) == expected, "every id exactly once"
    assert table.column("error").null_count == table.num_rows
    kept = set(data_keys())
    assert set(seen_before_outage) <= kept, f"good files lost: {set(seen_before_outage) - kept}"
