"""A job's confidence column, its base-model fallback counted in the manifest, and the report's
lowest-confidence rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import run_job
from pipeline.config import ConfigError
from pipeline.config_io import config_hash, load_config
from pipeline.outputs import read_output
from pipeline.run_report import LOWEST, PLOT_DIR, REPORT_JSON, REPORT_MD
from tests.pipeline.conftest import job, prompt, reference

ROWS = 70


def test_min_confidence_is_checked_naming_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {path: m}\nadapters: {path: a}\ninput: {uri: i}\noutput: {uri: o}\n")
    for bad, says in (("high", "routing.min_confidence: expected a number"), (".nan", "routing.min_confidence: must"),
                      ("true", "routing.min_confidence: expected a number")):
        with pytest.raises(ConfigError, match=says):
            load_config(path, {"routing.min_confidence": __import__("yaml").safe_load(bad)})
    with pytest.raises(ConfigError, match="routing.min_confidence: needs calibrated scores"):
        load_config(path, {"routing.min_confidence": 0.5, "routing.calibration_score": "raw"})
    a, b = load_config(path), load_config(path, {"routing.min_confidence": 0.5})
    assert config_hash(a) != config_hash(b), "the threshold changes results: a resume with another is refused"


def test_job_rows_carry_confidence_and_the_fallback_is_counted(ray_runtime, tiny_assets, tmp_path):
    model, pool = tiny_assets
    prompts = [prompt(i) for i in range(ROWS)]
    prompts[5] = ""  # an error row: no confidence
    ref = reference(model, pool, [p for p in prompts if p])
    threshold = float(np.quantile(list(ref["confidence"]), 0.3))
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), tmp_path / "in" / "p.parquet")
    config = job(model, pool, str(tmp_path / "in"), str(tmp_path / "out"), routing={"min_confidence": threshold},
                 resources={"rows_per_block": 16}, run={"max_error_fraction": 0.1})
    run_job(config, progress=False)
    out = tmp_path / "out"
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    ok = [r for r in rows.values() if r["error"] is None]
    assert len(ok) == ROWS - 1 and rows["p.parquet:5"]["confidence"] is None
    expected = dict(zip([f"p.parquet:{i}" for i, p in enumerate(prompts) if p], ref["confidence"]))
    below = {i for i, c in expected.items() if c < threshold}
    assert 0 < len(below) < len(ok)
    for r in ok:
        assert r["confidence"] == pytest.approx(expected[r["id"]], abs=1e-4), r["id"]
        if r["id"] in below:
            assert r["adapters"] == [] and "base model alone" in r["warning"], r["id"]
        else:
            assert len(r["adapters"]) == 2, r["id"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["base_only_rows"] == len(below) == manifest["report"]["base_only"]
    assert manifest["config"]["routing"]["min_confidence"] == threshold

    report = json.loads((out / REPORT_JSON).read_text())
    conf = report["confidence"]
    assert conf["rows"] == len(ok) and sum(conf["histogram"].values()) == len(ok)
    assert conf["base_only_rows"] == len(below)
    lowest = sorted(ok, key=lambda r: (r["confidence"], r["id"]))[:LOWEST]
    assert [r["id"] for r in conf["lowest"]] == [r["id"] for r in lowest]
    md = (out / REPORT_MD).read_text()
    assert "## Confidence" in md and "(confidence.png)" in md and (out / PLOT_DIR / "confidence.png").is_file()
    for r in lowest[:5]:
        assert f"| {r['id']} | {r['confidence']:.4f} |" in md
    highest = max(ok, key=lambda r: r["confidence"])["id"]
    assert f"| {highest} |" not in md, "only the lowest rows are listed"
