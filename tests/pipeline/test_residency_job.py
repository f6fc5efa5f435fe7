"""A job whose actors keep 8 of 64 adapters resident: the all-resident outputs, row for row, on SeaweedFS."""

from __future__ import annotations

import json

import numpy as np

from actors import LoGoPredictor
from pipeline import StorageConfig, read_output, run_job
from tests.pipeline.conftest import job, write_prompts
from tests.tiny import tiny_pool

SIZES = (40, 30)
ROUTING = {"k": 3, "calibration": "reference"}


def test_bounded_residency_job_on_s3_equals_all_resident(ray_runtime, tiny_assets, s3_server, tmp_path):
    model, _ = tiny_assets
    pool = tiny_pool(model, tmp_path / "pool", 64, seed=11)
    prompts = write_prompts(tmp_path / "in", SIZES)
    input_uri = s3_server.upload_dir(tmp_path / "in", "res/prompts")
    pool_uri = s3_server.upload_dir(pool, "res/adapters")
    storage = {"endpoint": s3_server.endpoint, "cache_dir": str(tmp_path / "cache")}
    outputs = {}
    for name, max_resident in (("all", None), ("eight", 8)):
        uri = f"s3://{s3_server.bucket}/res/runs/{name}"
        config = job(model, pool_uri, input_uri, uri, storage=storage, routing=ROUTING,
                     adapters={"max_resident": max_resident})
        report = run_job(config, progress=False)
        assert report.status == "committed" and report.rows == sum(SIZES) and report.errors == 0
        table = read_output(uri, StorageConfig(endpoint=s3_server.endpoint))
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == sum(SIZES)  # every id exactly once
        outputs[name] = {r["id"]: (r["output"], r["adapters"], r["weights"], r["error"]) for r in table.to_pylist()}
        batching = json.loads(s3_server.client().get_object(
            Bucket=s3_server.bucket, Key=f"res/runs/{name}/_manifest.json")["Body"].read())["batching"]
        assert batching == report.batching and batching["batches"] >= sum(SIZES) / 8
        if max_resident is None:
            assert batching["loads"] == 0 and batching["peak_resident"] == 64
        else:
            assert 0 < batching["peak_resident"] <= 8 and batching["loads"] > 8 and batching["evictions"] > 0
    assert outputs["eight"] == outputs["all"]
    # one routing index for the pool version, built by the first run's calibration task, read by every actor since
    assert len(list((tmp_path / "cache").rglob("routing-index/*.safetensors"))) == 1
    assert len({a for _, adapters, _, _ in outputs["all"].values() for a in adapters}) > 8

    # and in process, the predictor with the same bound gives the same rows
    ref = LoGoPredictor(str(model), str(pool), k=3, max_new_tokens=3, max_resident=8, batch_size=8,
                        calibration_prompts="reference")({"prompt": np.array(prompts, dtype=object)})
    expected = [f"part-{f}.parquet:{r}" for f, n in enumerate(SIZES) for r in range(n)]
    for i, row_id in enumerate(expected):
        output, adapters, weights, error = outputs["eight"][row_id]
        assert error is None and output == ref["output"][i] and adapters == list(ref["adapters"][i])
        np.testing.assert_allclose(weights, ref["weights"][i], rtol=0, atol=1e-5)
