"""A million rows through the pipeline, interrupted and resumed: exactly once per row, each input
row decoded once (plus at most one row group per boundary of the interrupted attempt's work)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import StorageConfig, run_job
from pipeline.errors import InjectedFault
from pipeline.outputs import scan
from tests.pipeline.conftest import job, settle

ROWS, GROUP = 1_000_000, 100_000


@pytest.mark.slow
def test_million_rows_resume_exactly_once(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    words = pa.array([f"q{i} add {i % 7} and {i % 5}" for i in range(1000)])
    table = pa.table({"prompt": words.take(pa.array(np.arange(ROWS) % 1000))})
    pq.write_table(table, tmp_path / "in" / "big.parquet", row_group_size=GROUP)
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), generation={"max_new_tokens": 1},
                 resources={"actors": 1, "batch_size": 512, "rows_per_block": 4096})
    with pytest.raises(InjectedFault):
        run_job(config, fail_after_files=40, progress=False)
    settle(tmp_path / "out" / "data")  # writes still in flight when the driver stopped land first
    report = run_job(config, progress=False)
    assert report.rows == ROWS and report.rows_resumed + report.rows_computed == ROWS
    earlier = [p for p in scan(str(tmp_path / "out" / "data"), StorageConfig()) if p.attempt != report.attempt]
    boundaries = 2 * sum(len(p.ranges) for p in earlier)  # each earlier range has two ends
    assert report.rows_computed <= report.rows_decoded <= report.rows_computed + GROUP * boundaries
    ids = pq.read_table(tmp_path / "out" / "data", columns=["id"]).column("id")
    assert len(ids) == ROWS and pc.count_distinct(ids).as_py() == ROWS
