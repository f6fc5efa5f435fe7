"""Input discovery, checks, ids and slices (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import InputConfig, InputError, StorageConfig
from pipeline.inputs import INPUT_ERROR, default_rows_per_block, discover, plan_slices, read_slice, row_ids

S = StorageConfig()


def write(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=4)


def test_discovery_is_recursive_sorted_and_skips_hidden_files(tmp_path):
    write(tmp_path / "b" / "x.parquet", prompt=["p"] * 3)
    write(tmp_path / "a.parquet", prompt=["p"] * 2)
    write(tmp_path / "_tmp" / "y.parquet", prompt=["p"])
    write(tmp_path / ".z.parquet", prompt=["p"])
    (tmp_path / "_SUCCESS").write_text("")
    files = discover(InputConfig(uri=str(tmp_path)), S)
    assert [(f.name, f.rows) for f in files] == [("a.parquet", 2), ("b/x.parquet", 3)]
    assert row_ids(files, InputConfig(uri=str(tmp_path)), S) == [["a.parquet:0", "a.parquet:1"],
                                                                   ["b/x.parquet:0", "b/x.parquet:1", "b/x.parquet:2"]]
    single = discover(InputConfig(uri=str(tmp_path / "a.parquet")), S)
    assert [(f.name, f.uri) for f in single] == [("a.parquet", str(tmp_path / "a.parquet"))]


def test_missing_input_and_missing_columns_are_named(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        discover(InputConfig(uri=str(tmp_path / "nope")), S)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.parquet files there"):
        discover(InputConfig(uri=str(tmp_path / "empty")), S)
    write(tmp_path / "in" / "a.parquet", prompt=["p"], task=["t"])
    message = r"a\.parquet: no column 'lang' \(input\.passthrough\); columns there: prompt, task"
    with pytest.raises(InputError, match=message):
        discover(InputConfig(uri=str(tmp_path / "in"), passthrough=("task", "lang")), S)
    with pytest.raises(InputError, match=r"no column 'key' \(input\.id_column\)"):
        discover(InputConfig(uri=str(tmp_path / "in"), id_column="key"), S)


def test_id_column_is_stringified_and_must_be_non_null(tmp_path):
    write(tmp_path / "a.parquet", prompt=["p", "q"], key=[7, 8])
    cfg = InputConfig(uri=str(tmp_path), id_column="key")
    assert row_ids(discover(cfg, S), cfg, S) == [["7", "8"]]
    write(tmp_path / "b.parquet", prompt=["p", "q"], key=pa.array([9, None], pa.int64()))
    with pytest.raises(InputError, match=r"b\.parquet: row 1 has a null id in column 'key'"):
        row_ids(discover(cfg, S), cfg, S)


def test_slices_skip_done_rows_and_read_across_row_groups(tmp_path):
    write(tmp_path / "a.parquet", prompt=[f"p{i}" for i in range(10)], task=[f"t{i}" for i in range(10)])
    cfg = InputConfig(uri=str(tmp_path), passthrough=("task",))
    files = discover(cfg, S)
    assert files[0].row_groups == (4, 4, 2)
    ids = row_ids(files, cfg, S)
    slices = plan_slices(files, ids, done={"a.parquet:0", "a.parquet:5"}, rows_per_block=3)
    assert [s.positions for s in slices] == [(1, 2, 3), (4, 6, 7), (8, 9)]
    table = read_slice(slices[1], cfg, S)  # spans row groups 1 and 2 minus a done row
    assert table.column("id").to_pylist() == ["a.parquet:4", "a.parquet:6", "a.parquet:7"]
    assert table.column("prompt").to_pylist() == ["p4", "p6", "p7"]
    assert table.column("task").to_pylist() == ["t4", "t6", "t7"]
    assert table.column(INPUT_ERROR).null_count == 3


def test_non_string_prompt_column_marks_rows_not_the_job(tmp_path):
    write(tmp_path / "a.parquet", prompt=[1, 2])
    cfg = InputConfig(uri=str(tmp_path))
    files = discover(cfg, S)
    table = read_slice(plan_slices(files, row_ids(files, cfg, S), set(), 10)[0], cfg, S)
    assert table.column("prompt").null_count == 2
    assert all("prompt is int64 in" in m and ", not string; store column 'prompt' as strings" in m
               for m in table.column(INPUT_ERROR).to_pylist())


def test_default_block_size_gives_every_actor_several_blocks():
    assert default_rows_per_block(210, actors=2, batch_size=8) == 27
    assert default_rows_per_block(10, actors=4, batch_size=8) == 8
    assert default_rows_per_block(10**7, actors=2, batch_size=8) == 4096
