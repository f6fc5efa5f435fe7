"""`logo-batch calibrate`: a seeded sample of a Parquet input, statistics written as JSON."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.calibration import REFERENCE_PROMPTS, CalibrationStats
from jobs.cli import main
from tests.actors.conftest import PROMPTS
from tests.tiny import tiny_adapter, tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    model = tiny_model_dir(root / "model")
    for i, name in enumerate(["x", "y", "z"]):
        tiny_adapter(model, root / "pool" / name, r=2 + i, seed=i)
    (root / "in").mkdir()
    for f in range(3):
        prompts = [f"{p} #{f}" for p in PROMPTS] + [None]
        pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), root / "in" / f"part-{f}.parquet")
    return root, model


def run(root, model, out, *extra):
    args = ["calibrate", "--model", str(model), "--adapters", str(root / "pool"), "--out", str(out), "--device", "cpu"]
    assert main([*args, *extra]) == 0
    return CalibrationStats.load(out)


def test_seeded_sample_of_input(setup, tmp_path):
    root, model = setup
    a = run(root, model, tmp_path / "a.json", "--prompts", str(root / "in"), "--sample", "20", "--seed", "3")
    b = run(root, model, tmp_path / "b.json", "--prompts", str(root / "in"), "--sample", "20", "--seed", "3")
    c = run(root, model, tmp_path / "c.json", "--prompts", str(root / "in"), "--sample", "20", "--seed", "4")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert a.mean != c.mean
    assert a.adapters == ("x", "y", "z") and a.seed == 3 and a.source.startswith("sample of")
    assert 18 <= a.count <= 20  # a sampled null prompt is skipped
    everything = run(root, model, tmp_path / "all.json", "--prompts", str(root / "in"), "--sample", "1000")
    assert everything.count == 3 * len(PROMPTS)


def test_reference_and_modules(setup, tmp_path):
    root, model = setup
    stats = run(root, model, tmp_path / "r.json", "--prompts", "reference", "--probe-module", "q_proj", "v_proj")
    assert stats.source == "reference" and stats.count == len(json.loads(REFERENCE_PROMPTS.read_text()))
    pairs = [f"model.layers.{b}.self_attn.{m}" for b in range(4) for m in ("q_proj", "v_proj")]
    assert stats.probe["pairs"] == pairs and len(stats.mean) == len(pairs)  # every block by default
    last = run(root, model, tmp_path / "l.json", "--prompts", "reference", "--probe-layers", "-1", "--probe-module",
               "v_proj")
    assert last.probe["pairs"] == ["model.layers.3.self_attn.v_proj"]
    assert last.mean == (stats.mean[-1],), "per-pair statistics do not depend on the other pairs"
    two = run(root, model, tmp_path / "t.json", "--prompts", "reference", "--probe-layers", "0", "-1")
    assert two.probe["pairs"] == [pairs[0], pairs[1], pairs[6], pairs[7]]
