"""End to end through a real S3 server (SeaweedFS): input, model, adapters and output all on S3."""

from __future__ import annotations

import json

import numpy as np

from pipeline import read_output, run_job
from pipeline.config import StorageConfig
from tests.pipeline.conftest import SIZES, assert_matches_reference, job, reference, write_prompts


def test_s3_end_to_end_matches_in_process_predictor(ray_runtime, tiny_assets, s3_server, tmp_path):
    model, pool = tiny_assets
    prompts = write_prompts(tmp_path / "in", SIZES)
    input_uri = s3_server.upload_dir(tmp_path / "in", "e2e/prompts")
    model_uri = s3_server.upload_dir(model, "e2e/model")
    pool_uri = s3_server.upload_dir(pool, "e2e/adapters")
    output_uri = f"s3://{s3_server.bucket}/e2e/runs/one"
    storage = {"endpoint": s3_server.endpoint, "cache_dir": str(tmp_path / "cache")}
    config = job(model_uri, pool_uri, input_uri, output_uri, storage=storage, input={"passthrough": ["prompt"]})

    report = run_job(config, progress=False)

    assert report.status == "committed" and report.rows == report.rows_computed == sum(SIZES)
    table = read_output(output_uri, StorageConfig(endpoint=s3_server.endpoint))
    ids = table.column("id").to_pylist()
    expected = [f"part-{f}.parquet:{r}" for f, n in enumerate(SIZES) for r in range(n)]
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)
    by_id = dict(zip(ids, table.column("prompt").to_pylist()))
    assert [by_id[i] for i in expected] == prompts
    assert_matches_reference(table, reference(model, pool, prompts), expected)

    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="e2e/runs/one/")["Contents"]]
    assert "e2e/runs/one/_SUCCESS" in keys and "e2e/runs/one/_manifest.json" in keys
    manifest = json.loads(client.get_object(Bucket=s3_server.bucket, Key="e2e/runs/one/_manifest.json")["Body"].read())
    assert manifest["input"]["files"][0] == {"uri": f"{input_uri}/part-0.parquet", "rows": SIZES[0]}
    assert {f"e2e/runs/one/{f['path']}" for f in manifest["output"]["files"]} == {
        k for k in keys if k.startswith("e2e/runs/one/data/")}
    # the actors used the node cache (one verified copy each of model and pool)
    cached = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "routing-index"]
    assert len(cached) == 2 and all((p / ".logo-batch-listing.json").exists() for p in cached)
    assert len(list((tmp_path / "cache" / "routing-index").glob("*.safetensors"))) == 1  # built once, shared
    assert np.isclose(sum(sum(w) for w in table.column("weights").to_pylist()), sum(SIZES))
