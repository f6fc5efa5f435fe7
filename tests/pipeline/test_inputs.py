"""Input discovery, checks, ids and slices (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import InputConfig, InputError, StorageConfig
from pipeline.inputs import (INPUT_ERROR, RowRange, Slice, check_nulls, default_rows_per_block, discover, plan_reads,
                             read_slice, read_unit, todo_ranges)

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
    cfg = InputConfig(uri=str(tmp_path))
    ids = [t.column("id").to_pylist() for unit in plan_reads(files, {}, 10) for t in read_unit(unit, cfg, S)]
    assert ids == [["a.parquet:0", "a.parquet:1"], ["b/x.parquet:0", "b/x.parquet:1", "b/x.parquet:2"]]
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
    files = discover(cfg, S)
    check_nulls(files, cfg, S)
    assert next(read_unit(plan_reads(files, {}, 10)[0], cfg, S)).column("id").to_pylist() == ["7", "8"]
    write(tmp_path / "b.parquet", prompt=["p", "q"], key=pa.array([9, None], pa.int64()))
    with pytest.raises(InputError, match=r"b\.parquet: row 1 has a null id in column 'key'"):
        check_nulls(discover(cfg, S), cfg, S)


def test_plan_follows_row_groups_and_decodes_each_row_once(tmp_path):
    # row groups of 10, 4, 4 and 12 rows; slices of at most 6 rows
    table = pa.table({"prompt": [f"p{i}" for i in range(30)], "task": [f"t{i}" for i in range(30)]})
    with pq.ParquetWriter(tmp_path / "a.parquet", table.schema) as writer:
        for start, size in ((0, 10), (10, 4), (14, 4), (18, 12)):
            writer.write_table(table.slice(start, size))
    cfg = InputConfig(uri=str(tmp_path), passthrough=("task",))
    files = discover(cfg, S)
    assert files[0].row_groups == (10, 4, 4, 12)
    units = plan_reads(files, {}, rows_per_block=6)
    assert [u.groups for u in units] == [(0,), (1, 2), (3,)]
    assert [[(s.start, s.stop) for s in u.slices] for u in units] == [[(0, 6), (6, 10)], [(10, 16), (16, 18)],
                                                                     [(18, 24), (24, 30)]]
    blocks = [t for unit in units for t in read_unit(unit, cfg, S)]
    assert [t.column("prompt").to_pylist() for t in blocks] == [[f"p{i}" for i in range(a, b)] for a, b in
                                                                ((0, 6), (6, 10), (10, 16), (16, 18), (18, 24), (24, 30))]
    assert blocks[3].column("task").to_pylist() == ["t16", "t17"]
    assert blocks[3].column("_logo_row").to_pylist() == [16, 17]
    assert blocks[3].column(INPUT_ERROR).null_count == 2
    decoded = sum(sum(t.column("_logo_decoded").to_pylist()) for t in blocks)
    assert decoded == 30  # each row decoded once, though row groups 0 and 3 feed two slices each


def test_resume_plan_skips_done_ranges_and_decodes_one_group_per_boundary(tmp_path):
    write(tmp_path / "a.parquet", prompt=[f"p{i}" for i in range(10)])  # row groups of 4, 4, 2
    cfg = InputConfig(uri=str(tmp_path))
    files = discover(cfg, S)
    assert todo_ranges(10, [(5, 7), (0, 1)]) == [(1, 5), (7, 10)]
    units = plan_reads(files, {"a.parquet": [(0, 1), (5, 7)]}, rows_per_block=3)
    slices = [(s.start, s.stop) for u in units for s in u.slices]
    assert slices == [(1, 4), (4, 5), (7, 10)]
    assert [u.groups for u in units] == [(0,), (1, 2)]
    blocks = [t for u in units for t in read_unit(u, cfg, S)]
    assert [t.column("id").to_pylist() for t in blocks][1] == ["a.parquet:4"]
    assert sum(sum(t.column("_logo_decoded").to_pylist()) for t in blocks) == 10  # 6 to do + boundary groups
    assert plan_reads(files, {"a.parquet": [(0, 10)]}, 3) == []
    assert RowRange(4, 9).rows == 5


def test_non_string_prompt_column_marks_rows_not_the_job(tmp_path):
    write(tmp_path / "a.parquet", prompt=[1, 2])
    cfg = InputConfig(uri=str(tmp_path))
    files = discover(cfg, S)
    table = next(read_unit(plan_reads(files, {}, 10)[0], cfg, S))
    assert table.column("prompt").null_count == 2
    assert all("prompt is int64 in" in m and ", not string; store column 'prompt' as strings" in m
               for m in table.column(INPUT_ERROR).to_pylist())
    sample = read_slice(Slice(files[0], (1,), ("x",)), cfg, S)
    assert sample.column("id").to_pylist() == ["x"] and "int64" in sample.column(INPUT_ERROR)[0].as_py()


def test_sample_rows_across_row_groups(tmp_path):
    write(tmp_path / "a.parquet", prompt=[f"p{i}" for i in range(10)])
    cfg = InputConfig(uri=str(tmp_path))
    f = discover(cfg, S)[0]
    table = read_slice(Slice(f, (1, 6, 9), ("1", "6", "9")), cfg, S)
    assert table.column("prompt").to_pylist() == ["p1", "p6", "p9"]


def test_default_block_size_gives_every_actor_several_blocks():
    assert default_rows_per_block(210, actors=2, batch_size=8) == 27
    assert default_rows_per_block(10, actors=4, batch_size=8) == 8
    assert default_rows_per_block(10**7, actors=2, batch_size=8) == 4096


def corrupt_first_row_group(path) -> None:
    """Overwrite the middle of row group 0's prompt pages; the footer stays valid."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.data_page_offset
    data = bytearray(path.read_bytes())
    for at in range(start + 8, start + chunk.total_compressed_size - 2):
        data[at] = 0xEE
    path.write_bytes(bytes(data))


def rows_of(tmp_path, **cfg) -> list[dict]:
    config = InputConfig(uri=str(tmp_path), **cfg)
    files = discover(config, S)
    return [row for unit in plan_reads(files, {}, 3) for t in read_unit(unit, config, S) for row in t.to_pylist()]


def test_hostile_text_columns_and_a_corrupt_page_become_row_errors_naming_the_file(tmp_path):
    prompts = pa.array([b"fine 0", b"\xff\xfe not utf-8", b"fine 2", b"fine 3", b"\xc3"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "a-utf8.parquet", row_group_size=2)
    pq.write_table(pa.table({"prompt": pa.array(["d0", "d1", "d0"]).dictionary_encode(),
                             "task": pa.array(["t", "u", "t"]).dictionary_encode()}), tmp_path / "b-dict.parquet")
    pq.write_table(pa.table({"prompt": pa.array(["v0", "v1"], pa.string_view()),
                             "task": pa.array(["t", "u"], pa.string_view())}), tmp_path / "c-view.parquet")
    pq.write_table(pa.table({"prompt": [f"long prompt text number {i}" * 4 for i in range(8)]}),
                   tmp_path / "d-corrupt.parquet", row_group_size=4, compression="snappy",
                   use_dictionary=False)
    corrupt_first_row_group(tmp_path / "d-corrupt.parquet")
    rows = {r["id"]: r for r in rows_of(tmp_path)}
    assert len(rows) == 18
    assert rows["a-utf8.parquet:1"]["prompt"] is None
    assert rows["a-utf8.parquet:1"][INPUT_ERROR].startswith("prompt is not valid UTF-8 (row 1 of ")
    assert "row 4 of" in rows["a-utf8.parquet:4"][INPUT_ERROR]
    assert "a-utf8.parquet" in rows["a-utf8.parquet:4"][INPUT_ERROR]
    assert [rows[f"a-utf8.parquet:{i}"]["prompt"] for i in (0, 2, 3)] == ["fine 0", "fine 2", "fine 3"]
    assert [rows[f"b-dict.parquet:{i}"]["prompt"] for i in range(3)] == ["d0", "d1", "d0"]
    assert [rows[f"c-view.parquet:{i}"]["prompt"] for i in range(2)] == ["v0", "v1"]
    for i in range(4):
        assert rows[f"d-corrupt.parquet:{i}"]["prompt"] is None
        assert rows[f"d-corrupt.parquet:{i}"][INPUT_ERROR].startswith("row group 0 of ")
        assert "d-corrupt.parquet cannot be decoded" in rows[f"d-corrupt.parquet:{i}"][INPUT_ERROR]
    assert [rows[f"d-corrupt.parquet:{i}"]["prompt"] for i in range(4, 8)] == [f"long prompt text number {i}" * 4
                                                                                for i in range(4, 8)]
    assert all(r[INPUT_ERROR] is None for k, r in rows.items() if k[:1] in "bc")
    # pass-through dictionary and string_view columns arrive as plain strings, the same type from every file
    (tmp_path / "a-utf8.parquet").unlink()
    (tmp_path / "d-corrupt.parquet").unlink()
    config = InputConfig(uri=str(tmp_path), passthrough=("task",))
    tables = [t for unit in plan_reads(discover(config, S), {}, 3) for t in read_unit(unit, config, S)]
    assert {t.schema.field("task").type for t in tables} == {pa.string()}
    assert pa.concat_tables(tables).column("task").to_pylist() == ["t", "u", "t", "t", "u"]


def test_corrupt_page_with_an_id_column_stops_naming_the_file(tmp_path):
    pq.write_table(pa.table({"prompt": [f"long prompt text number {i}" * 4 for i in range(8)], "key": list(range(8))}),
                   tmp_path / "d.parquet", row_group_size=4, compression="snappy",
                   use_dictionary=False)
    corrupt_first_row_group(tmp_path / "d.parquet")
    with pytest.raises(InputError, match=r"row group 0 of .*d\.parquet cannot be decoded .*ids are unknown"):
        rows_of(tmp_path, id_column="key")


def test_pass_through_types_that_differ_between_files_are_refused_before_work(tmp_path):
    write(tmp_path / "a.parquet", prompt=["p"] * 2, task=[1, 2])
    write(tmp_path / "b.parquet", prompt=["p"] * 2, task=["x", "y"])
    write(tmp_path / "c.parquet", prompt=["p"] * 2, task=pa.array(["x", "y"]).dictionary_encode())
    with pytest.raises(InputError, match=r"pass-through column 'task' \(input\.passthrough\) has type int64 in "
                                         r".*a\.parquet but string in .*b\.parquet; give it one type"):
        discover(InputConfig(uri=str(tmp_path), passthrough=("task",)), S)
    (tmp_path / "a.parquet").unlink()
    assert len(discover(InputConfig(uri=str(tmp_path), passthrough=("task",)), S)) == 2  # dictionary == string
