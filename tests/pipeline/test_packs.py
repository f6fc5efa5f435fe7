"""Small files packed: rows of several files in one read task and one block, each id exactly once."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_output, run_job
from pipeline.errors import InjectedFault
from pipeline.inputs import InputFile, plan_reads
from pipeline.packs import Pack, pack_units, read_task
from pipeline.config import InputConfig, StorageConfig
from tests.pipeline.conftest import job, settle


def _files(sizes):
    return [InputFile(f"/in/{i}.parquet", f"{i}.parquet", n, (n,), "string") for i, n in enumerate(sizes)]


def test_small_units_are_packed_up_to_rows_per_block_and_large_ones_stay():
    units = plan_reads(_files([1, 1, 1, 30, 1, 1, 9, 2]), {}, rows_per_block=10)
    tasks = pack_units(units, rows_per_block=10)
    shapes = [tuple(u.file.name for u in t.units) if isinstance(t, Pack) else t.file.name for t in tasks]
    # 1+1+1 | 30 (three slices) | 1+1 (then +9 > 10) | 9 (+2 > 10) | 2
    assert shapes == [("0.parquet", "1.parquet", "2.parquet"), "3.parquet", ("4.parquet", "5.parquet"),
                      "6.parquet", "7.parquet"]
    assert sum(t.rows for t in tasks) == 46 and all(t.rows <= 10 for t in tasks if isinstance(t, Pack))


def test_a_pack_reads_as_one_block_with_each_rows_file_and_position(tmp_path):
    for i in range(5):
        pq.write_table(pa.table({"prompt": [f"p{i}-{j}" for j in range(i + 1)]}), tmp_path / f"{i}.parquet")
    files = [InputFile(str(tmp_path / f"{i}.parquet"), f"{i}.parquet", i + 1, (i + 1,), "string") for i in range(5)]
    done = {"2.parquet": [(0, 1)]}  # resumed: row 0 of file 2 is written already
    (pack,) = pack_units(plan_reads(files, done, 100), rows_per_block=100)
    (block,) = list(read_task(pack, InputConfig(uri=str(tmp_path)), StorageConfig()))
    assert block.num_rows == 14 and block.column("prompt").to_pylist()[3:5] == ["p2-1", "p2-2"]
    assert block.column("id").to_pylist()[:4] == ["0.parquet:0", "1.parquet:0", "1.parquet:1", "2.parquet:1"]
    assert block.column("_logo_file").to_pylist()[:4] == [0, 1, 1, 2]
    assert block.column("_logo_row").to_pylist()[:4] == [0, 0, 1, 1]
    assert sum(block.column("_logo_decoded").to_pylist()) == 15  # file 2's one row group decoded whole


def _one_row_files(directory, n):
    directory.mkdir()
    for i in range(n):
        pq.write_table(pa.table({"prompt": [f"q{i}: add {i % 7} and {i % 5}"], "key": [f"k{i:04d}"]}),
                       directory / f"f{i:04d}.parquet")
    return [f"k{i:04d}" for i in range(n)]


@pytest.mark.slow
def test_two_hundred_one_row_files_run_as_few_blocks_each_id_once(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    ids = _one_row_files(tmp_path / "in", 200)
    rows_per_block = 25
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), input={"id_column": "key"},
                 resources={"rows_per_block": rows_per_block}, generation={"max_new_tokens": 1})
    report = run_job(config, progress=False)
    assert report.rows == report.rows_computed == 200
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert len(manifest["output"]["files"]) <= math.ceil(200 / rows_per_block) + 2  # one data file per block
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == ids


@pytest.mark.slow
def test_packed_small_files_resume_each_id_once(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    ids = _one_row_files(tmp_path / "in", 120)
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"),
                 resources={"rows_per_block": 10, "actors": 1}, generation={"max_new_tokens": 1})
    with pytest.raises(InjectedFault):
        run_job(config, fail_after_files=3, progress=False)
    settle(tmp_path / "out" / "data")
    report = run_job(config, progress=False)
    assert 0 < report.rows_resumed < 120 and report.rows_resumed + report.rows_computed == 120
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("id").to_pylist()) == sorted(f"f{i:04d}.parquet:0" for i in range(120))
    assert table.num_rows == 120 and len(ids) == 120
