"""Data files, the scan that resumes from them, exactly-once verification, and storage primitives."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import OutputError, StorageConfig, config_from_dict, read_output
from pipeline import commit, outputs, storage
from pipeline.inputs import InputFile
from pipeline.outputs import OUTPUT_FIELDS, scan, write_part

S = StorageConfig()
NO_STATS = lambda contents: None  # noqa: E731 - a run without calibration statistics


NAMES = ("x.parquet", "y.parquet")


def results(rows: list[int], errors: int = 0, file: int = 0, decoded: int = 0) -> pa.Table:
    """A block of results for rows of input file NAMES[file], with the internal columns."""
    n = len(rows)
    table = pa.table({"id": [f"{NAMES[file]}:{r}" for r in rows], "output": ["o"] * n, "adapters": [["a", "b"]] * n,
                      "weights": [[0.6, 0.4]] * n, "confidence": [0.5] * n, "error": ["bad"] * errors + [None] * (n - errors),
                      "warning": [None] * n, "prompt_tokens": [3] * n, "output_tokens": [2] * n},
                     schema=pa.schema(OUTPUT_FIELDS))
    return (table.append_column("_logo_file", pa.array([file] * n, pa.int32()))
            .append_column("_logo_row", pa.array(rows, pa.int64()))
            .append_column("_logo_decoded", pa.array([decoded] + [0] * (n - 1), pa.int64())))


def put(data: str, rows: list[int], attempt: str, cfg=S, **kwargs) -> pa.Table:
    return write_part(results(rows, **kwargs), data_uri=data, config=cfg, attempt=attempt, names=NAMES)


def test_scan_reads_footers_keeps_complete_files_and_removes_partial_and_overlapping_ones(tmp_path):
    data = str(tmp_path / "data")
    summary = put(data, [0, 1, 2, 5], "20260101T000000Z-aaaaaa", errors=1, decoded=9)
    assert summary.to_pylist()[0] | {"file": None} == {"file": None, "rows": 4, "errors": 1, "decoded": 9}
    put(data, [3], "20260102T000000Z-bbbbbb", file=1)
    put(data, [4, 5], "20260103T000000Z-cccccc")  # repeats row 5 of x.parquet
    (tmp_path / "data" / "part-20260104T000000Z-dddddd-0.parquet").write_bytes(b"PAR1 cut short")
    (tmp_path / "data" / ".tmp-part-x.parquet").write_bytes(b"")
    kept_names = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert len(scan(data, S, repair=False)) == 2 and sorted(p.name for p in (tmp_path / "data").iterdir()) == kept_names
    parts = scan(data, S)
    assert [p.ranges for p in parts] == [[("x.parquet", 0, 3), ("x.parquet", 5, 6)], [("y.parquet", 3, 4)]]
    assert [p.attempt for p in parts] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"]
    assert parts[0].errors == 1 and parts[0].adapter_use == {"a": 4, "b": 4} and parts[0].output_tokens == 8
    assert parts[0].decoded == 9 and parts[0].rows == 4
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in parts)
    written = pq.read_table(tmp_path / "data" / parts[0].name)
    assert written.column_names == [f.name for f in OUTPUT_FIELDS]  # internal columns dropped
    assert outputs.done_ranges(parts) == {"x.parquet": [(0, 3), (5, 6)], "y.parquet": [(3, 4)]}


def test_scan_keeps_a_complete_file_it_cannot_read_and_names_it(tmp_path):
    foreign = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1]}), foreign)  # a whole Parquet file, but not one of this run's
    ended = b"PAR1" + b"\0" * 40 + (8).to_bytes(4, "little") + b"PAR1"  # ends like Parquet: not cut short
    for index, content in enumerate((foreign.getvalue().to_pybytes(), ended)):
        data = str(tmp_path / f"data{index}")
        put(data, [0, 1], "x-1")
        bad = tmp_path / f"data{index}" / "part-x-2-0.parquet"
        bad.write_bytes(content)
        with pytest.raises(OutputError, match=r"cannot read data file .*part-x-2-0\.parquet .*it was not deleted"):
            scan(data, S)
        assert bad.read_bytes() == content


def test_verify_requires_every_row_exactly_once_per_range(tmp_path):
    data = str(tmp_path / "data")
    put(data, [0, 1], "x-1")
    put(data, [2], "x-2")
    parts = scan(data, S)
    x3 = InputFile("i/x.parquet", "x.parquet", 3, (3,), "string")
    commit.verify(parts, [x3])
    with pytest.raises(OutputError, match=r"1 input rows have no output \(e\.g\. row 3 of i/x\.parquet\)"):
        commit.verify(parts, [InputFile("i/x.parquet", "x.parquet", 4, (4,), "string")])
    with pytest.raises(OutputError, match=r"2 input rows have no output \(e\.g\. row 0 of i/y\.parquet\)"):
        commit.verify(parts, [x3, InputFile("i/y.parquet", "y.parquet", 2, (2,), "string")])
    with pytest.raises(OutputError, match=r"hold rows up to 2 of i/x\.parquet, which has 2"):
        commit.verify(parts, [InputFile("i/x.parquet", "x.parquet", 2, (2,), "string")])
    with pytest.raises(OutputError, match=r"row 0 of i/x\.parquet is in two data files"):
        commit.verify(parts + parts, [x3])
    with pytest.raises(OutputError, match=r"rows of 'x\.parquet', which is not in the input"):
        commit.verify(parts, [InputFile("i/z.parquet", "z.parquet", 3, (3,), "string")])


def _config(out, **routing):
    return config_from_dict({"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"},
                             "output": {"uri": str(out)}, "routing": routing})


def test_open_run_claims_resumes_and_refuses_foreign_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "i").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "i" / "x.parquet")
    files = [InputFile("i/x.parquet", "x.parquet", 3, (3,), "string")]
    out = tmp_path / "out"
    assert commit.committed_manifest(_config(out)) is None
    commit.open_run(_config(out), files, NO_STATS)
    record = json.loads((out / "_job.json").read_text())
    commit.open_run(_config(out), files, NO_STATS)  # same job: resume
    assert json.loads((out / "_job.json").read_text()) == record
    with pytest.raises(OutputError, match="different job"):
        commit.open_run(_config(out, k=3), files, NO_STATS)
    with pytest.raises(OutputError, match="different input files"):
        commit.open_run(_config(out), [InputFile("i/x.parquet", "x.parquet", 4, (4,), "string")], NO_STATS)
    foreign = tmp_path / "foreign"
    put(str(foreign / "data"), [0], "x-1")
    with pytest.raises(OutputError, match="has files under data/ but no _job.json"):
        commit.open_run(_config(foreign), files, NO_STATS)
    assert not (foreign / "_job.json").exists()
    with pytest.raises(FileNotFoundError, match="no _SUCCESS marker"):
        read_output(str(out))
    # committed: recognised from _SUCCESS and _job.json alone
    commit.commit(_config(out), {"config_hash": record["config_hash"], "output": {"rows": 3}})
    assert commit.committed_manifest(_config(out))["output"] == {"rows": 3}
    with pytest.raises(OutputError, match="committed run .* belongs to a different job"):
        commit.committed_manifest(_config(out, k=3))
    (out / "_job.json").write_text(json.dumps({**record, "format": "logo-batch-run/1"}))
    with pytest.raises(OutputError, match="has the run layout 'logo-batch-run/1'"):
        commit.committed_manifest(_config(out))


def test_write_if_absent_locally_and_on_s3(tmp_path, s3_server):
    cfg = StorageConfig(endpoint=s3_server.endpoint)
    for uri in (str(tmp_path / "m" / "_SUCCESS"), f"s3://{s3_server.bucket}/markers/_SUCCESS"):
        assert storage.write_if_absent(uri, b"first", cfg) is True
        assert storage.write_if_absent(uri, b"second", cfg) is False
        assert storage.read_bytes(uri, cfg) == b"first"
        storage.write_bytes(uri, b"third", cfg)
        assert storage.read_bytes(uri, cfg) == b"third"
        storage.delete(uri, cfg)
        assert storage.read_bytes(uri, cfg) is None


def test_s3_data_files_scan_and_clear(s3_server):
    cfg = StorageConfig(endpoint=s3_server.endpoint)
    data = f"s3://{s3_server.bucket}/scan-test/data"
    put(data, [0, 1], "x-1", cfg=cfg)
    parts = scan(data, cfg)
    assert [p.ranges for p in parts] == [[("x.parquet", 0, 2)]]
    assert [o.key for o in storage.list_objects(data, cfg)] == [parts[0].name]
    # An S3 object is never partial: one that does not read stops the scan, named, and is kept.
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="scan-test/data/part-y-2-0.parquet", Body=b"junk")
    with pytest.raises(OutputError, match=r"cannot read data file s3://.*/scan-test/data/part-y-2-0\.parquet .*"
                                          r"not deleted"):
        scan(data, cfg)
    assert [o.key for o in storage.list_objects(data, cfg)] == sorted([parts[0].name, "part-y-2-0.parquet"])
    storage.delete(f"{data}/part-y-2-0.parquet", cfg)
    fs, path = storage.filesystem(f"{data}/{parts[0].name}", cfg)
    assert pq.read_table(path, filesystem=fs).schema.names[:4] == ["id", "output", "adapters", "weights"]
    assert outputs.error_reason("prompt has 812 tokens, more than 64") == "prompt has N tokens, more than N"
    assert storage.delete_prefix(data, cfg) == 1 and storage.list_objects(data, cfg) == []


def test_resume_refuses_input_model_or_adapter_files_replaced_at_the_same_path(tiny_assets, tmp_path):
    import shutil

    from pipeline import inputs
    from tests.pipeline.conftest import job, write_prompts

    model, pool = (shutil.copytree(p, tmp_path / p.name) for p in tiny_assets)
    write_prompts(tmp_path / "in", (6, 4))

    def claim(out: str):
        config = job(model, pool, str(tmp_path / "in"), str(tmp_path / out))
        commit.open_run(config, inputs.discover(config.input, config.storage), NO_STATS)
        return config

    claim("out1")
    write_prompts(tmp_path / "in", (6, 4), row_group_size=2)  # same rows, new file
    with pytest.raises(OutputError, match=r"other contents .*input file part-0\.parquet changed \(size:.*; "
                                          r"input file part-1\.parquet changed.*--overwrite"):
        claim("out1")
    claim("out2")
    weights = pool / "copy" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(OutputError, match=r"adapter file copy/adapter_model\.safetensors changed \(sha256:"):
        claim("out2")
    claim("out3")
    (pool / "spell").rename(tmp_path / "spell")
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    with pytest.raises(OutputError, match=r"model file config\.json changed.*adapter file spell/"
                                          r"adapter_config\.json was removed"):
        claim("out3")
    record = json.loads((tmp_path / "out3" / "_job.json").read_text())
    assert set(record["contents"]) == {"input", "model", "adapters"}
    assert set(record["contents"]["input"]) == {"part-0.parquet", "part-1.parquet"}


def test_resume_refuses_an_s3_input_object_replaced_at_the_same_key(tiny_assets, s3_server, tmp_path):
    from pipeline import inputs
    from tests.pipeline.conftest import job, write_prompts

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (5,))
    prefix = f"s3://{s3_server.bucket}/pins-test"
    key = "pins-test/in/part-0.parquet"
    s3_server.client().upload_file(str(tmp_path / "in" / "part-0.parquet"), s3_server.bucket, key)
    config = job(model, pool, f"{prefix}/in", f"{prefix}/out", storage={"endpoint": s3_server.endpoint})
    commit.open_run(config, inputs.discover(config.input, config.storage), NO_STATS)
    commit.open_run(config, inputs.discover(config.input, config.storage), NO_STATS)  # unchanged: a resume
    write_prompts(tmp_path / "in", (5,), row_group_size=1)
    s3_server.client().upload_file(str(tmp_path / "in" / "part-0.parquet"), s3_server.bucket, key)
    with pytest.raises(OutputError, match=r"input file part-0\.parquet changed \(size:\d+,etag:\w+ -> "):
        commit.open_run(config, inputs.discover(config.input, config.storage), NO_STATS)


def test_copy_without_errors_keeps_the_other_rows_and_deletes_nothing(tmp_path):
    data = str(tmp_path / "data")
    put(data, [0, 1, 2, 5], "20260101T000000Z-aaaaaa", errors=2)  # rows 0 and 1 failed
    put(data, [3], "20260102T000000Z-bbbbbb", file=1, errors=1)  # the whole file failed
    put(data, [7], "20260103T000000Z-cccccc")
    parts = scan(data, S)
    assert [p.error_ranges for p in parts] == [[("x.parquet", 0, 2)], [("y.parquet", 3, 4)], []]
    old = sorted(p.name for p in (tmp_path / "data").iterdir())
    copies, replaced = outputs.copy_without_errors(data, parts, S)
    assert replaced == [parts[0].name, parts[1].name]
    assert [c.ranges for c in copies] == [[("x.parquet", 2, 3), ("x.parquet", 5, 6)]]  # the all-error file: no copy
    assert set(old) <= {p.name for p in (tmp_path / "data").iterdir()}  # nothing deleted: the old run stands whole
    after = scan(data, S, ignore=replaced)
    assert sorted(p.ranges for p in after) == [[("x.parquet", 2, 3), ("x.parquet", 5, 6)], [("x.parquet", 7, 8)]]
    assert sum(p.errors for p in after) == 0 and sorted(p.attempt for p in after) == ["20260101T000000Z-aaaaaa",
                                                                                      "20260103T000000Z-cccccc"]
    assert pq.read_table(tmp_path / "data" / copies[0].name).column("error").null_count == copies[0].rows
    # a committed manifest's files are kept before any others, whatever their names
    assert {p.name for p in scan(data, S, repair=False, prefer={copies[0].name})} == {copies[0].name, old[1], old[2]}
    assert outputs.subtract([("x", 0, 10)], [("x", 2, 4), ("x", 6, 10)]) == [("x", 0, 2), ("x", 4, 6)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_keeps_a_second_driver_out_and_a_stale_one_is_taken_over(tmp_path, s3_server, where, caplog):
    from pipeline.lease import LEASE, Lease

    out = str(tmp_path / "out") if where == "local" else f"s3://{s3_server.bucket}/lease-test"
    data = {"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"}, "output": {"uri": out},
            "run": {"lease_timeout_s": 1.0}, "storage": {"endpoint": s3_server.endpoint}}
    config = config_from_dict(data)
    first, second = Lease(config, "attempt-1"), Lease(config, "attempt-2")
    first.acquire()
    uri = storage.join(out, LEASE)
    beat = json.loads(storage.read_bytes(uri, config.storage))["heartbeat"]
    with pytest.raises(OutputError, match=r"being run by another driver \(.*:attempt-1, heartbeat 0 s ago\)"):
        second.acquire()
    import time

    time.sleep(0.5)
    assert json.loads(storage.read_bytes(uri, config.storage))["heartbeat"] > beat  # renewed while it runs
    first._stop.set()  # the first driver dies: no more heartbeats
    first._thread.join()
    time.sleep(1.2)
    stale_etag = second._read()[1]
    second.acquire()  # stale: taken over
    assert "taking over the lease" in caplog.text
    if where == "s3":  # a third driver that saw the same stale lease cannot take it too (If-Match)
        assert not Lease(config, "attempt-3")._replace(stale_etag)
        assert json.loads(storage.read_bytes(uri, config.storage))["owner"].endswith(":attempt-2")
    with pytest.raises(OutputError, match=r"lost the lease .* to .*:attempt-2; this driver stops without deleting, "
                                          "writing or committing"):
        first.check()
    if where == "s3":  # a renewal that succeeded but whose reply was lost: the retry's 412 keeps the lease
        bucket, key = storage.split_s3(uri)
        storage.s3_client(config.storage).put_object(Bucket=bucket, Key=key, Body=second._record())
        assert second._read()[1] != second.etag  # the ETag this driver knows is the one before that write
        assert second._renew_once()
        second.check()
        assert not first._renew_once()  # a driver that lost it gets nothing back that way
    second.renewed -= 0.6  # no successful renewal for more than half the timeout: it acts no more
    with pytest.raises(OutputError, match=r"lost the lease .* to nobody yet: it was last renewed 1 s ago"):
        second.check()
    second.lost = None
    second.renewed += 0.6
    first.release()  # not its lease any more: left alone
    assert json.loads(storage.read_bytes(uri, config.storage))["owner"].endswith(":attempt-2")
    second.release()
    assert storage.read_bytes(uri, config.storage) is None


def test_run_refuses_an_output_another_driver_holds_before_touching_it(tiny_assets, tmp_path):
    from pipeline import run_job
    from pipeline.lease import Lease
    from tests.pipeline.conftest import job, write_prompts

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (4,))
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), output={"overwrite": True})
    put(str(tmp_path / "out" / "data"), [0], "x-1")
    other = Lease(config, "other-driver")
    other.acquire()
    try:
        with pytest.raises(OutputError, match=r"being run by another driver \(.*:other-driver"):
            run_job(config, progress=False)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_lease.json", "data"]
        assert len(list((tmp_path / "out" / "data").iterdir())) == 1  # --overwrite did not delete its files
    finally:
        other.release()


class ThrottlingProxy:
    """An HTTP proxy in front of the real S3 server that answers 503 SlowDown to every read of a
    data file (HEAD or GET of `.../data/part-*`) and forwards everything else unchanged (signed
    requests stay valid: the Host header is passed through)."""

    def __init__(self, backend: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        target = urlparse(backend)
        proxy = self
        self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command in ("GET", "HEAD") and "/data/part-" in self.path:
                    proxy.refused += 1
                    reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(reply)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_s3_throttled_reads_never_delete_good_data_files(s3_server):
    direct = StorageConfig(endpoint=s3_server.endpoint)
    data = f"s3://{s3_server.bucket}/throttle-test/data"
    put(data, [0, 1], "x-1", cfg=direct)
    put(data, [2], "x-2", cfg=direct)
    before = storage.list_objects(data, direct)
    proxy = ThrottlingProxy(s3_server.endpoint)
    try:
        with pytest.raises(OutputError, match=r"cannot read data file s3://.*/throttle-test/data/part-x-.*it was "
                                              r"not deleted\. If storage was unavailable, rerun the job"):
            scan(data, StorageConfig(endpoint=proxy.endpoint))
        assert proxy.refused >= outputs.READ_ATTEMPTS  # it did try again
    finally:
        proxy.close()
    assert storage.list_objects(data, direct) == before  # both good files are still there
    assert [p.ranges for p in scan(data, direct)] == [[("x.parquet", 0, 2)], [("x.parquet", 2, 3)]]


def test_a_lease_whose_driver_died_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    """A driver killed on this host (its process gone) blocks its output for no lease timeout; a
    driver that still runs here (e.g. paused) keeps it."""
    import subprocess
    import sys
    import textwrap

    from pipeline.lease import Lease

    out = str(tmp_path / "out")
    data = {"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"}, "output": {"uri": out},
            "run": {"lease_timeout_s": 600.0}}
    hold = textwrap.dedent(f"""
        import os, sys, time
        from pipeline import config_from_dict
        from pipeline.lease import Lease
        Lease(config_from_dict({data!r}), "attempt-dead").acquire()
        print("held", flush=True)
        if sys.argv[1] == "die":
            os._exit(9)  # killed: no release, no more heartbeats
        time.sleep(120)
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    alive = subprocess.Popen([sys.executable, "-c", hold, "live"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert alive.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="being run by another driver"):
            Lease(config_from_dict(data), "attempt-2").acquire()  # its driver runs: the lease stands
    finally:
        alive.kill()
        alive.wait()
    Path(out, "_lease.json").unlink()
    dead = subprocess.run([sys.executable, "-c", hold, "die"], capture_output=True, text=True, env=env)
    assert dead.returncode == 9 and dead.stdout.strip() == "held"
    record = json.loads(Path(out, "_lease.json").read_text())
    assert record["pid"] != __import__("os").getpid() and record["host"]
    taker = Lease(config_from_dict(data), "attempt-3")
    taker.acquire()  # at once, though the lease is 600 s from its timeout
    try:
        assert "has exited" in caplog.text
        assert json.loads(Path(out, "_lease.json").read_text())["owner"].endswith(":attempt-3")
        taker.check()
    finally:
        taker.release()
