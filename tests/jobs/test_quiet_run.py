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


PROJECT_LINE = re.compile(r"^(logo-batch\b|  \S)")
"""What a successful command may print: its own lines (and the report's indented lines)."""


LIBRARY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ |^\(\w+ pid=|Warning\b|warnings\.warn|"
                          r"it/s\]|\bTip:|Progress bars|botocore|credentials\.py|^\[\d{4}-|^\s*File \"")
"""A line of Ray's, a library's or Python's (a log record, a worker's output, a warning, a progress bar)."""


def _stale_ray_tmpdir() -> str:
    """A Ray temp folder (short: its sockets live below it) whose `ray_current_cluster` file names a
    cluster that is gone, as a killed `ray start` leaves it."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="lbr", dir="/tmp")
    Path(folder, "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens there
    return folder


def test_successful_local_run_prints_only_its_own_lines(tiny_assets, tmp_path):
    """As a user runs it (no terminal, no RAY_AUTH_MODE, a stale cluster file from a killed Ray):
    it starts its own Ray, says each phase before the first block, and prints nothing of Ray's or
    transformers'."""
    import shutil

    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(12)], "id": [f"r{i}" for i in range(12)]}),
                   tmp_path / "in" / "p.parquet")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_TMPDIR"] = ray_tmp = _stale_ray_tmpdir()
    try:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--model", str(model), "--adapters",
                               str(pool), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                               "--k", "2", "--max-new-tokens", "2", "--batch-size", "4", "--id-column", "id"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "logo-batch run committed" in done.stdout
    assert "Failed to connect to GCS" not in text, "joined the stale cluster"
    foreign = [line for line in text.splitlines() if line.strip() and not PROJECT_LINE.match(line)]
    assert foreign == [], "lines not of logo-batch: " + "\n".join(foreign[:10])
    said = (done.stderr + done.stdout).splitlines()  # the summary goes to stdout, last
    phases = [next(i for i, line in enumerate(said) if key in line)
              for key in ("checking ids", "calibrating", "starting 1 LoGo actor", "run committed")]
    assert phases == sorted(phases), "a line for each phase, in order"
    assert (tmp_path / "out" / "_report" / "report.md").is_file()


def test_validate_prints_only_its_own_lines(tiny_assets, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(12)]}), tmp_path / "in" / "p.parquet")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "validate", "--model", str(model), "--adapters",
                           str(pool), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--k", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert text.splitlines()[-1] == "no problems found"
    foreign = [line for line in text.splitlines() if LIBRARY_LINE.search(line)]
    assert foreign == [], "lines of Ray or a library: " + "\n".join(foreign[:10])


def test_missing_s3_credentials_is_one_line_with_the_fix(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")  # no profile either
    base = f"s3://{s3_server.bucket}/nocreds"
    for command in ("run", "validate"):
        done = subprocess.run([sys.executable, "-m", "jobs.cli", command, "--model", f"{base}/m", "--adapters",
                               f"{base}/a", "--input", f"{base}/in", "--output", f"{base}/out",
                               "--endpoint", s3_server.endpoint],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == 2, lines
        assert not any("Traceback" in line or "NoCredentialsError" in line for line in lines), lines
        said = [line for line in lines if "S3 credentials" in line]
        assert len(said) == 1 and "AWS_ACCESS_KEY_ID" in said[0], lines  # one line, with the fix
        assert len(lines) == (1 if command == "run" else 2), lines  # validate: its "1 problem(s):" header


def test_ctrl_c_exits_130_with_one_line(tiny_assets, tmp_path):
    """SIGINT while the job runs (here: while it reads and checks, before any Ray): exit 130 and a
    line saying how to resume, no traceback."""
    import signal
    import time

    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(12)]}), tmp_path / "in" / "p.parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "--model", str(model), "--adapters", str(pool),
                             "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--k", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(6)  # past the imports: inside the job
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "rerun the same command to resume" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
