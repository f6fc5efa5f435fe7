"""A successful local `logo-batch run`, as a user runs it (its own Ray, no terminal): no error-level
line, no token-authentication warning, and the run's report beside its output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.pipeline.conftest import prompt

ROOT = Path(__file__).resolve().parents[2]
ERROR_LEVEL = re.compile(r"^\[[^\]]* E \d+ \d+\]|\bERROR\b|^Traceback|\bE\d{4} ")


def test_successful_local_run_prints_no_error_level_line(tiny_assets, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(12)]}), tmp_path / "in" / "p.parquet")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--model", str(model), "--adapters", str(pool),
                           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--k", "2",
                           "--max-new-tokens", "2", "--batch-size", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "logo-batch run committed" in done.stdout
    assert [line for line in text.splitlines() if ERROR_LEVEL.search(line)] == []
    assert "Token authentication is enabled" not in text
    assert (tmp_path / "out" / "report.md").is_file()
