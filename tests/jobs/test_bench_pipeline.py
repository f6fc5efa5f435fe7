"""The pipeline benchmark, small: every case commits its rows, decodes each input row once, and the
report carries the figures the README's table is made of (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main


@pytest.mark.slow
def test_pipeline_bench_small(s3_server, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--pipeline", "--rows", "2000", "--row-groups", "2000,300", "--validate-rows", "2000,40000",
                 "--batch-size", "64", "--s3-endpoint", s3_server.endpoint, "--out", str(out)]) == 0
    report = json.loads((out / "bench-pipeline.json").read_text())
    assert report["predictor_rows_per_second"] > 0
    runs = report["runs"]
    assert [(r["row_group"], r["storage"]) for r in runs] == [(2000, "local"), (2000, "s3"), (300, "local"), (300, "s3")]
    for r in runs:
        assert r["rows"] == 2000 and r["rows_decoded"] == 2000  # each input row decoded once
        assert r["files"] >= 2 and r["first_file_seconds"] > 0 and r["driver_peak_mb"] > 0
        assert r["vs_predictor"] == pytest.approx(r["rows_per_second"] / r["predictor_rows_per_second"], rel=0.01)
    planned = report["validate"]
    assert [v["rows_in"] for v in planned] == [2000, 40000] and all(v["problems"] == [] for v in planned)
    assert planned[1]["slices"] > planned[0]["slices"]
    assert "| validate rows | plan s |" in capsys.readouterr().out
