"""`logo-batch validate`: every problem listed with exit 2, prompt statistics, the plan; nothing written."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import main
from pipeline import config_from_dict
from pipeline.outputs import FORMAT, write_part
from pipeline.validate import sample_prompts, validate_job
from pipeline import inputs
from tests.pipeline.conftest import write_prompts


def _args(model, pool, tmp_path, *extra):
    return ["validate", "--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--max-new-tokens", "2", *extra]


def test_good_job_prints_statistics_and_plan_and_writes_nothing(tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (30, 20), row_group_size=8)
    odd = ["fine prompt", "", "   ", None, "long " * 40]
    pq.write_table(pa.table({"prompt": odd, "task": ["t"] * 5, "key": [f"z{i}" for i in range(5)]}),
                   tmp_path / "in" / "part-9.parquet")
    assert main(_args(model, pool, tmp_path, "--set", "generation.max_prompt_tokens=20",
                      "--set", "resources.rows_per_block=5")) == 0
    out = capsys.readouterr().out
    assert "input: 3 Parquet files, 55 rows, 8 row groups" in out
    assert "55 of 55 rows to compute (0 already written in 0 data files)" in out
    assert "8 row groups; 8 read tasks, 14 slices of up to 5 rows; rows to decode 55" in out
    assert "prompts: sampled 55; blank (or not text) 3; over-long (> 20 tokens) 1 (truncated with a warning)" in out
    assert "adapters: 4 checked, 0 refused" in out and "no problems found" in out
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_with_exit_2(tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (6,))
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "in" / "numbers.parquet")
    shutil.copytree(pool, tmp_path / "pool")
    (tmp_path / "pool" / "copy" / "adapter_config.json").write_text('{"r": 2}')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_job.json").write_text(json.dumps({"format": FORMAT, "config_hash": "x" * 64,
                                                            "input_files": []}))
    assert main(_args(model, tmp_path / "pool", tmp_path, "--set", "routing.probe_layer=9")) == 2
    out = capsys.readouterr().out
    assert "4 problem(s):" in out
    assert "numbers.parquet: prompt column 'prompt' has type int64, not string" in out
    assert "adapter 'copy'" in out
    assert "routing.probe_layers: block 9 is out of range for a model with 2 blocks" in out
    assert "the partial run at" in out and "belongs to a different job" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_job.json"]
    assert main(["validate", "--model", "m", "--adapters", "a", "--input", "i", "--output", "o",
                 "--set", "routing.kk=1"]) == 2
    assert "routing.kk: unknown key" in capsys.readouterr().err


def test_plan_of_a_partial_run_counts_what_is_written(tiny_assets, tmp_path):
    from pipeline import commit

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (40,), row_group_size=10)
    config = config_from_dict({"model": {"path": str(model)}, "adapters": {"path": str(pool)},
                               "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                               "resources": {"rows_per_block": 10, "gpus_per_actor": 0}})  # auto: cpu, float32
    files = inputs.discover(config.input, config.storage)
    commit.open_run(config, files, lambda contents: None)  # no statistics needed for the plan
    block = next(inputs.read_unit(inputs.plan_reads(files, {}, 15)[0], config.input, config.storage))
    n = block.num_rows
    results = pa.table({"id": block.column("id"), "output": ["o"] * n, "adapters": [["copy"]] * n,
                        "weights": pa.array([[1.0]] * n, pa.list_(pa.float32())), "error": pa.nulls(n, pa.string()),
                        "warning": pa.nulls(n, pa.string()), "prompt_tokens": [1] * n, "output_tokens": [1] * n})
    for name in inputs.INTERNAL_COLUMNS:
        results = results.append_column(name, block.column(name))
    write_part(results, data_uri=str(tmp_path / "out" / "data"), config=config.storage, attempt="a-1",
               names=("part-0.parquet",))
    result = validate_job(config)
    assert result.problems == []
    assert result.plan.remaining == 40 - n and [(s.start, s.stop) for u in result.plan.units for s in u.slices][0] == (n, 25)
    assert result.plan.units[0].groups == (1, 2)  # row group 1 holds the boundary: decoded again
    assert f"{40 - n} of 40 rows to compute ({n} already written in 1 data files)" in result.format()
    assert len(sample_prompts(config, files, 8)) == 8
