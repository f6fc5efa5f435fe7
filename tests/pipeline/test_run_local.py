"""End to end on local files with a local Ray: results, exactly-once resume, bad rows, refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors import LoGoPredictor
from pipeline import ConfigError, InputError, OutputError, read_output, run_job
from pipeline.config import RunConfig
from pipeline.errors import InjectedFault, StageError, TooManyErrors
from tests.pipeline.conftest import (OPTIONS, SIZES, assert_matches_reference, job, reference, settle,
                                     write_prompts)


def test_local_end_to_end_matches_in_process_predictor(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    prompts = write_prompts(tmp_path / "in", SIZES)
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), input={"passthrough": ["task"]})
    report = run_job(config, progress=False)

    table = read_output(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    expected = [f"part-{f}.parquet:{r}" for f, n in enumerate(SIZES) for r in range(n)]
    assert len(ids) == len(set(ids)) == sum(SIZES)
    assert set(ids) == set(expected)
    assert table.schema.names == ["id", "output", "adapters", "weights", "confidence", "error", "warning",
                                  "prompt_tokens", "output_tokens", "task"]
    assert table.schema.field("adapters").type.value_type == pa.string()
    assert table.schema.field("weights").type.value_type == pa.float32()
    assert_matches_reference(table, reference(model, pool, prompts), expected)
    tasks = dict(zip(table.column("id").to_pylist(), table.column("task").to_pylist()))
    assert tasks["part-1.parquet:3"] == f"t{(80 + 3) % 3}"

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert report.status == "committed" and report.rows == report.rows_computed == sum(SIZES)
    assert report.rows_decoded == manifest["decoded_rows"] == sum(SIZES)  # every input row decoded once
    assert manifest["input"]["files"] == [{"uri": str(tmp_path / "in" / f"part-{i}.parquet"), "rows": n}
                                          for i, n in enumerate(SIZES)]
    assert sum(f["rows"] for f in manifest["output"]["files"]) == sum(SIZES)
    assert len(manifest["output"]["files"]) >= 4  # several blocks, so both actors had work
    assert manifest["errors"]["rows"] == 0
    assert sum(manifest["adapter_usage"].values()) == sum(SIZES) * OPTIONS["routing"]["k"]
    assert (tmp_path / "out" / "_SUCCESS").exists()

    (tmp_path / "in").rename(tmp_path / "moved")  # the input gone since the commit: said, never "nothing to do"
    with pytest.raises(OutputError, match="was computed from other input than is there now: the input cannot be "
                                          "listed now"):
        run_job(config, progress=False)
    (tmp_path / "moved").rename(tmp_path / "in")
    again = run_job(config, progress=False)  # nothing to do: only listed, no input file opened
    assert again.status == "already_committed" and again.rows_computed == 0 and again.rows == sum(SIZES)
    assert len(list((tmp_path / "out" / "data").iterdir())) == len(manifest["output"]["files"])


def test_resume_after_injected_fault_computes_only_the_missing_rows(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", SIZES)
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), input={"id_column": "key"},
                 resources={"rows_per_block": 20})
    with pytest.raises(InjectedFault):
        run_job(config, fail_after_files=3, progress=False)
    out = tmp_path / "out"
    settle(out / "data")  # writes still in flight when the driver stopped land first
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    first = pq.read_table(out / "data").column("id").to_pylist()
    assert 0 < len(first) < sum(SIZES) and len(first) == len(set(first))
    # a partial write left by a crash: unreadable, must be removed and its rows redone
    (out / "data" / "part-20000101T000000Z-dead00-000000000000.parquet").write_bytes(b"PAR1 truncated")

    report = run_job(config, progress=False)
    assert report.rows == sum(SIZES)
    assert report.rows_resumed == len(first)
    assert report.rows_computed == sum(SIZES) - len(first)
    table = read_output(str(out))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f"k{i:05d}" for i in range(sum(SIZES)))  # each id exactly once
    manifest = json.loads((out / "_manifest.json").read_text())
    attempts = manifest["attempts"]
    assert len(attempts) == 2 and [a["rows"] for a in attempts] == [len(first), sum(SIZES) - len(first)]
    assert not any("dead00" in f["path"] for f in manifest["output"]["files"])


def test_resume_with_slice_boundaries_inside_row_groups(ray_runtime, tiny_assets, tmp_path):
    """Row groups of 50 rows, slices of 20: slices end inside row groups; an interrupted run resumes
    with every row exactly once, decoding only the row groups that hold rows still to do."""
    model, pool = tiny_assets
    sizes = (120, 90)
    prompts = write_prompts(tmp_path / "in", sizes, row_group_size=50)
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), resources={"rows_per_block": 20})
    with pytest.raises(InjectedFault):
        run_job(config, fail_after_files=2, progress=False)
    out = tmp_path / "out"
    settle(out / "data")  # writes still in flight when the driver stopped land first
    report = run_job(config, progress=False)
    manifest = json.loads((out / "_manifest.json").read_text())
    first, second = manifest["attempts"]
    assert 0 < first["rows"] < sum(sizes) and report.rows_resumed == first["rows"]
    assert report.rows == sum(sizes) and report.rows_computed == second["rows"] == sum(sizes) - first["rows"]
    table = read_output(str(out))
    expected = [f"part-{f}.parquet:{r}" for f, n in enumerate(sizes) for r in range(n)]
    assert sorted(table.column("id").to_pylist()) == sorted(expected)  # each row exactly once
    assert_matches_reference(table, reference(model, pool, prompts), expected)
    # decoded: the rows computed now, plus at most one 50-row group per boundary of earlier work
    boundaries = sum(2 * len(r["ranges"]) for r in _records(out, manifest, report.attempt, other=True))
    assert report.rows_computed <= report.rows_decoded <= report.rows_computed + 50 * boundaries


def _records(out, manifest, attempt, other=False):
    from pipeline.outputs import PART_KEY

    for entry in manifest["output"]["files"]:
        if (entry["attempt"] != attempt) == other:
            yield json.loads(pq.read_schema(out / entry["path"]).metadata[PART_KEY])


def test_bad_rows_become_error_rows_and_are_counted(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    good = [f"fine prompt {i}" for i in range(6)]
    pq.write_table(pa.table({"prompt": good[:3] + [None, "", "x" * 200] + good[3:]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "in" / "b.parquet")  # not strings
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"),
                 generation={"overlong": "error", "max_prompt_tokens": 64}, resources={"actors": 1})
    # 5 of 11 rows fail: above the default run.max_error_fraction the run keeps its rows, uncommitted
    with pytest.raises(TooManyErrors, match=r"5 of 11 rows \(45\.5%\) have an error, more than "
                                            r"run\.max_error_fraction=0\.01; the run is not committed.*--retry-errors"):
        run_job(config, progress=False)
    assert not (tmp_path / "out" / "_SUCCESS").exists() and list((tmp_path / "out" / "data").iterdir())
    config = dataclasses.replace(config, run=RunConfig(max_error_fraction=0.5))
    report = run_job(config, progress=False)
    assert report.rows_computed == 0 and report.rows_resumed == 11  # accepted: nothing computed again
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 11 and report.errors == 5
    assert "null" in rows["a.parquet:3"]["error"]
    assert "empty" in rows["a.parquet:4"]["error"]
    assert "tokens" in rows["a.parquet:5"]["error"]
    assert "int64" in rows["b.parquet:0"]["error"] and "b.parquet" in rows["b.parquet:1"]["error"]
    for row_id in ("a.parquet:0", "a.parquet:6", "a.parquet:8"):
        assert rows[row_id]["error"] is None and rows[row_id]["output"] is not None
        assert len(rows[row_id]["adapters"]) == 2
    for row_id in ("a.parquet:3", "b.parquet:0"):
        assert rows[row_id]["output"] is None and rows[row_id]["adapters"] == []
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["errors"]["rows"] == 5 and sum(manifest["errors"]["by_reason"].values()) == 5
    # --retry-errors on the committed run: only the 5 error rows are computed again, each once
    before = {name.name for name in (tmp_path / "out" / "data").iterdir()}
    retried = run_job(config, progress=False, retry_errors=True)
    assert retried.rows_computed == 5 and retried.rows_resumed == 6 and retried.errors == 5
    again = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(again) == sorted(rows)
    assert {i: r["output"] for i, r in again.items()} == {i: r["output"] for i, r in rows.items()}
    after = {name.name for name in (tmp_path / "out" / "data").iterdir()}
    with_errors = {f["path"].rsplit("/", 1)[-1] for f in manifest["output"]["files"] if f["errors"]}
    assert with_errors and not with_errors & after  # files with error rows were replaced ...
    assert before - with_errors <= after  # ... and the others kept
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["output"]["rows"] == 11 and manifest["errors"]["rows"] == 5


def test_missing_prompt_column_fails_before_any_work(tiny_assets, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a"], "task": ["t"]}), tmp_path / "in" / "x.parquet")
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"x\.parquet: no column 'prompt' \(input\.prompt_column\); "
                                         r"columns there: text, task"):
        run_job(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_duplicate_id_fails_before_any_work(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (5, 5))
    table = pq.read_table(tmp_path / "in" / "part-1.parquet")
    keys = table.column("key").to_pylist()
    keys[2] = "k00001"  # the id of part-0 row 1
    pq.write_table(table.set_column(2, "key", pa.array(keys)), tmp_path / "in" / "part-1.parquet")
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), input={"id_column": "key"})
    with pytest.raises(InputError, match=r"duplicate id 'k00001'.*part-0\.parquet row 1 and .*part-1\.parquet row 2"):
        run_job(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_other_jobs_output_is_refused_and_overwrite_replaces_it(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (12,))
    one_actor = {"actors": 1}
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), resources=one_actor)
    first = run_job(config, progress=False)
    other = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), routing={"k": 1}, resources=one_actor)
    from pipeline import OutputError

    with pytest.raises(OutputError, match="different job"):
        run_job(other, progress=False)
    replaced = run_job(job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), routing={"k": 1},
                           output={"overwrite": True}, resources=one_actor), progress=False)
    assert replaced.status == "committed" and replaced.rows_computed == 12 and replaced.attempt != first.attempt
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert len(rows) == 12 and all(len(r["adapters"]) == 1 for r in rows)
    assert all(replaced.attempt in f.name for f in (tmp_path / "out" / "data").iterdir())


def test_input_calibration_matches_in_process_predictor(ray_runtime, tiny_assets, tmp_path):
    from pipeline.calibration import sample_prompts

    model, pool = tiny_assets
    prompts = write_prompts(tmp_path / "in", (9, 7))
    routing = {"calibration": "input", "calibration_sample": 6, "calibration_min_rows": 6}  # the default score
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), routing=routing, resources={"actors": 1})
    run_job(config, progress=False)
    sample = sample_prompts(config.input, config.storage, 6, 0)
    assert len(sample) == 6 and set(sample) <= set(prompts)
    predictor = LoGoPredictor(model=str(model), adapters=str(pool), k=2, max_new_tokens=3,
                              calibration_prompts=sample)
    ref = predictor({"prompt": np.array(prompts, dtype=object)})
    order = [f"part-{f}.parquet:{r}" for f, n in enumerate((9, 7)) for r in range(n)]
    assert_matches_reference(read_output(str(tmp_path / "out")), ref, order)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    import hashlib

    digest = hashlib.sha256((tmp_path / "out" / "_calibration.json").read_bytes()).hexdigest()
    assert manifest["calibration"] == {"file": "_calibration.json", "setting": "input", "score": "zscore",
                                       "source": f"input sample of {tmp_path / 'in'}", "prompts": 6, "seed": 0,
                                       "sha256": digest}  # the statistics every row was routed with
    stored = json.loads((tmp_path / "out" / "_calibration.json").read_text())
    assert stored["mean"] == [list(row) for row in predictor.calibration.mean] and stored["count"] == 6
    with_reference = reference(model, pool, prompts)
    assert any(list(a) != list(b) for a, b in zip(with_reference["adapters"], ref["adapters"]))  # the source mattered


def test_small_input_calibrates_on_the_reference_set_and_says_so(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    prompts = write_prompts(tmp_path / "in", (5,))
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), routing={"calibration": "input"},
                 resources={"actors": 1})
    run_job(config, progress=False)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["calibration"]["setting"] == "input"
    assert manifest["calibration"]["source"] == ("reference (the input has 5 usable prompts, fewer than "
                                                 "routing.calibration_min_rows=32)")
    assert_matches_reference(read_output(str(tmp_path / "out")), reference(model, pool, prompts),
                             [f"part-0.parquet:{r}" for r in range(5)])


def test_output_inside_input_is_refused(tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (3,))
    with pytest.raises(ConfigError, match=r"output\.uri .* overlaps input\.uri"):
        run_job(job(model, pool, str(tmp_path / "in"), str(tmp_path / "in" / "out")), progress=False)
    assert not (tmp_path / "in" / "out").exists()


@pytest.mark.parametrize("spelling", ["symlink", "dotdot", "symlinked-input"])
def test_output_inside_input_is_refused_through_symlinks_and_dotdot(tiny_assets, tmp_path, spelling):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (3,))
    (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    inp, out = {"symlink": (tmp_path / "in", tmp_path / "link" / "out"),
                "dotdot": (tmp_path / "in", tmp_path / "in" / ".." / "in" / "x"),
                "symlinked-input": (tmp_path / "link", tmp_path / "in" / "out")}[spelling]
    with pytest.raises(ConfigError, match=r"output\.uri .* overlaps input\.uri"):
        run_job(job(model, pool, str(inp), str(out)), progress=False)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["part-0.parquet"]


def test_s3_output_overlap_compares_normalised_keys(tiny_assets):
    from pipeline.runner import check_sources

    model, pool = tiny_assets
    for out in ("s3://b/in/../in/out", "s3://b/in//out", "s3://b/./in/out/"):
        with pytest.raises(ConfigError, match=r"output\.uri .* overlaps input\.uri"):
            check_sources(job(model, pool, "s3://b/in", out))
    check_sources(job(model, pool, "s3://b/in", "s3://b/input-results"))  # a shared prefix is not an overlap


def test_actor_resources_share_the_cpus_and_leave_room_for_reads(ray_runtime, tiny_assets, tmp_path):
    from pipeline.dataflow import actor_resources

    model, pool = tiny_assets
    config = job(model, pool, "in", "out")  # 2 actors on the session's 2-CPU Ray, no GPU
    assert actor_resources(config) == (0.5, 0.0)
    assert actor_resources(job(model, pool, "in", "out", resources={"actors": 1})) == (1.0, 0.0)
    assert actor_resources(job(model, pool, "in", "out", resources={"gpus_per_actor": 0.5})) == (1.0, 0.5)
    assert actor_resources(job(model, pool, "in", "out", resources={"cpus_per_actor": 0.25})) == (0.25, 0.0)


def test_bad_adapter_stops_the_job_with_the_actors_reason(ray_runtime, tiny_assets, tmp_path):
    import shutil

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (6,))
    shutil.copytree(pool, tmp_path / "pool")
    (tmp_path / "pool" / "copy" / "adapter_config.json").write_text('{"r": 2}')
    config = job(model, tmp_path / "pool", str(tmp_path / "in"), str(tmp_path / "out"), resources={"actors": 1})
    with pytest.raises(StageError, match=r"a LoGo actor could not start: .*adapter 'copy'"):
        run_job(config, progress=False)
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "_SUCCESS").exists()


def test_hostile_input_files_give_error_rows_not_a_dead_job(ray_runtime, tiny_assets, tmp_path):
    from tests.pipeline.test_inputs import corrupt_first_row_group

    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    text = pa.array([b"fine 0", b"\xff\xfe not utf-8", b"fine 2"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": text, "task": ["a", "b", "c"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array(["d0", "d1"]).dictionary_encode(),
                             "task": pa.array(["x", "y"]).dictionary_encode()}), tmp_path / "in" / "b.parquet")
    pq.write_table(pa.table({"prompt": pa.array(["v0", "v1"], pa.string_view()),
                             "task": pa.array(["v", "w"], pa.string_view())}), tmp_path / "in" / "c.parquet")
    pq.write_table(pa.table({"prompt": [f"long prompt text number {i}" * 4 for i in range(8)], "task": ["t"] * 8}),
                   tmp_path / "in" / "d.parquet", row_group_size=4, compression="snappy", use_dictionary=False)
    corrupt_first_row_group(tmp_path / "in" / "d.parquet")
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), input={"passthrough": ["task"]},
                 resources={"actors": 1}, run={"max_error_fraction": 0.5})
    report = run_job(config, progress=False)
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert len(rows) == 15 and report.errors == 5
    assert "not valid UTF-8 (row 1 of" in rows["a.parquet:1"]["error"]
    assert all("row group 0 of" in rows[f"d.parquet:{i}"]["error"] for i in range(4))
    good = [i for i, r in rows.items() if r["error"] is None]
    assert len(good) == 10 and all(rows[i]["output"] is not None for i in good)
    assert [rows[f"{f}.parquet:1"]["task"] for f in "bc"] == ["y", "w"]
