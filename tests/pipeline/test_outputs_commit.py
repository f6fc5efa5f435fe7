"""Data files, the scan that resumes from them, exactly-once verification, and storage primitives."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import OutputError, StorageConfig, config_from_dict, read_output
from pipeline import commit, outputs, storage
from pipeline.inputs import InputFile
from pipeline.outputs import OUTPUT_FIELDS, scan, write_part

S = StorageConfig()


def results(ids: list[str], errors: int = 0) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "output": ["o"] * n, "adapters": [["a", "b"]] * n, "weights": [[0.6, 0.4]] * n,
                     "error": ["bad"] * errors + [None] * (n - errors), "warning": [None] * n,
                     "prompt_tokens": [3] * n, "output_tokens": [2] * n}, schema=pa.schema(OUTPUT_FIELDS))


def test_scan_keeps_complete_files_and_removes_partial_and_duplicate_ones(tmp_path):
    data = str(tmp_path / "data")
    summary = write_part(results(["a", "b"], errors=1), data_uri=data, config=S, attempt="20260101T000000Z-aaaaaa")
    assert summary.to_pylist()[0]["rows"] == 2 and summary.to_pylist()[0]["errors"] == 1
    write_part(results(["c"]), data_uri=data, config=S, attempt="20260102T000000Z-bbbbbb")
    write_part(results(["b", "d"]), data_uri=data, config=S, attempt="20260103T000000Z-cccccc")  # repeats b
    (tmp_path / "data" / "part-20260104T000000Z-dddddd-0.parquet").write_bytes(b"PAR1 cut short")
    (tmp_path / "data" / ".tmp-part-x.parquet").write_bytes(b"")
    parts = scan(data, S)
    assert [p.ids for p in parts] == [["a", "b"], ["c"]]
    assert [p.attempt for p in parts] == ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"]
    assert parts[0].errors == 1 and parts[0].adapter_use == {"a": 2, "b": 2} and parts[0].output_tokens == 4
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in parts)


def test_verify_requires_every_id_exactly_once(tmp_path):
    data = str(tmp_path / "data")
    write_part(results(["a", "b"]), data_uri=data, config=S, attempt="x-1")
    parts = scan(data, S)
    commit.verify(parts, [["a"], ["b"]])
    with pytest.raises(OutputError, match=r"1 input rows have no output \(e\.g\. id 'c'\)"):
        commit.verify(parts, [["a", "b", "c"]])
    with pytest.raises(OutputError, match=r"1 output rows are not in the input \(e\.g\. id 'b'\)"):
        commit.verify(parts, [["a"]])
    with pytest.raises(OutputError, match=r"id 'a' is in two data files"):
        commit.verify(parts + parts, [["a", "b"]])


def _config(out, **routing):
    return config_from_dict({"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"},
                             "output": {"uri": str(out)}, "routing": routing})


def test_open_run_claims_resumes_and_refuses_foreign_outputs(tmp_path):
    files = [InputFile("i/x.parquet", "x.parquet", 3, (3,), "string")]
    out = tmp_path / "out"
    assert commit.open_run(_config(out), files).committed is None
    record = json.loads((out / "_job.json").read_text())
    assert commit.open_run(_config(out), files).committed is None  # same job: resume
    assert json.loads((out / "_job.json").read_text()) == record
    with pytest.raises(OutputError, match="different job"):
        commit.open_run(_config(out, k=3), files)
    with pytest.raises(OutputError, match="different input files"):
        commit.open_run(_config(out), [InputFile("i/x.parquet", "x.parquet", 4, (4,), "string")])
    foreign = tmp_path / "foreign"
    write_part(results(["a"]), data_uri=str(foreign / "data"), config=S, attempt="x-1")
    with pytest.raises(OutputError, match="has files under data/ but no _job.json"):
        commit.open_run(_config(foreign), files)
    assert not (foreign / "_job.json").exists()
    with pytest.raises(FileNotFoundError, match="no _SUCCESS marker"):
        read_output(str(out))


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
    write_part(results(["a", "b"]), data_uri=data, config=cfg, attempt="x-1")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="scan-test/data/part-y-2-0.parquet", Body=b"junk")
    parts = scan(data, cfg)
    assert [p.ids for p in parts] == [["a", "b"]]
    assert [o.key for o in storage.list_objects(data, cfg)] == [parts[0].name]
    fs, path = storage.filesystem(f"{data}/{parts[0].name}", cfg)
    assert pq.read_table(path, filesystem=fs).schema.names[:4] == ["id", "output", "adapters", "weights"]
    assert outputs.error_reason("prompt has 812 tokens, more than 64") == "prompt has N tokens, more than N"
    assert storage.delete_prefix(data, cfg) == 1 and storage.list_objects(data, cfg) == []
