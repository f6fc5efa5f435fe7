"""`logo-batch run`: flags and config file to a job, refusals with exit status 2, too many error rows
with exit status 3, the final report."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import main
from tests.pipeline.conftest import write_prompts

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_key_in_file_or_flag_exits_2_naming_it(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("model: {path: m}\nadapters: {path: a}\ninput: {uri: i}\noutput: {uri: o}\nrouting: {kk: 3}\n")
    assert main(["run", "--config", str(path)]) == 2
    assert "routing.kk: unknown key; known keys: k, signal" in capsys.readouterr().err
    assert main(["run", "--model", "m", "--adapters", "a", "--input", "i", "--output", "o",
                 "--set", "generation.max_new_token=3"]) == 2
    assert "generation.max_new_token: unknown key" in capsys.readouterr().err


def test_missing_prompt_column_exits_2_before_any_work(tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"question": ["a"]}), tmp_path / "in" / "q.parquet")
    assert main(["run", "--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "q.parquet: no column 'prompt' (input.prompt_column); columns there: question" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_from_flags_then_rerun_says_committed(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (7, 5))
    args = ["run", "--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--k", "3", "--max-new-tokens", "2", "--actors", "1",
            "--batch-size", "4", "--set", "input.passthrough=[task]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "logo-batch run committed" in out and "rows 12: computed now 12, resumed 0; errors 0" in out
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["config"]["routing"]["k"] == 3 and manifest["config"]["input"]["passthrough"] == ["task"]
    assert sum(manifest["adapter_usage"].values()) == 12 * 3
    assert main(args) == 0
    assert "logo-batch run already committed" in capsys.readouterr().out


def test_too_many_errors_exits_3_and_retry_errors_recomputes_only_them(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["add 1 and 2", None, "add 3 and 4", ""]}), tmp_path / "in" / "p.parquet")
    args = ["run", "--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--max-new-tokens", "2", "--actors", "1", "--batch-size", "4"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "2 of 4 rows (50.0%) have an error, more than run.max_error_fraction=0.01" in err
    assert not (tmp_path / "out" / "_SUCCESS").exists() and list((tmp_path / "out" / "data").iterdir())
    assert main(args + ["--retry-errors", "--set", "run.max_error_fraction=0.5"]) == 0
    assert "rows 4: computed now 2, resumed 2; errors 2" in capsys.readouterr().out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_pipeline_imports_ray_data_and_jobs_run_stays_thin():
    for path in (ROOT / "actors").rglob("*.py"):
        assert not any(n == "ray" or n.startswith("ray.") for n in _imports(path)), f"{path} imports ray"
    for path in (ROOT / "jobs").rglob("*.py"):
        assert not any(n == "ray.data" or n.startswith("ray.data.") for n in _imports(path)), f"{path} imports ray.data"
    for path in (ROOT / "pipeline").glob("*.py"):
        if path.name != "dataflow.py":
            assert not any(n.startswith("ray") for n in _imports(path)), f"{path}: only dataflow.py imports ray"
        assert len(path.read_text().splitlines()) < 400, path
    assert not any(n.startswith("actors") for n in _imports(ROOT / "jobs" / "run.py"))
