"""A resume through `logo-batch run` with every key that does not change a result set otherwise, and
one refused for a key that does, naming it."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from pipeline import load_config, read_output, run_job
from pipeline.errors import InjectedFault
from tests.pipeline.conftest import OPTIONS, SIZES, settle, write_prompts

# Every key outside the job's hash, with a value other than the interrupted run's (and the spellings of
# the same values: dtype and device that `auto` resolves to here, the input as another path to the
# same place, probe modules in another order).
FLIPPED = {
    "generation.grouping": False, "generation.max_groups": 1, "generation.group_overhead": 1.0,
    "generation.decode_union_cost": 0.5, "generation.probe_bucket_overhead": 1.0,
    "generation.generate_step_slots": 1.0, "generation.ordering": "input", "generation.time_groups": True,
    "adapters.max_resident": 3, "model.dtype": "float32", "model.device": "cpu",
    "routing.probe_module": ["v_proj", "q_proj"],
    "resources.actors": 1, "resources.batch_size": 5, "resources.rows_per_block": 30,
    "resources.cpus_per_actor": 0.5, "resources.gpus_per_actor": 0.0,
    "storage.retries": 3, "storage.region": "eu-west-1",
    "run.max_error_fraction": 0.5, "run.lease_timeout_s": 60.0,
}


@pytest.mark.slow  # an interrupted run and its resume: about a minute here
def test_resume_accepts_every_key_outside_the_hash_and_names_a_key_inside(ray_runtime, tiny_assets, tmp_path,
                                                                          capsys):
    from tests.pipeline.test_config import NOT_HASHED

    from actors.options import RETIRED

    retired = {f"generation.{key}" for key in RETIRED}  # still read from job files, and ignored
    assert {k for k in FLIPPED if k.split(".")[0] in ("adapters", "generation")} == NOT_HASHED | retired
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", SIZES)
    out = tmp_path / "out"
    job = {"model": {"path": str(model)}, "adapters": {"path": str(pool)},
           "input": {"uri": str(tmp_path / "in"), "id_column": "key"}, "output": {"uri": str(out)},
           "routing": {**OPTIONS["routing"], "probe_module": ["q_proj", "v_proj"]},
           "generation": OPTIONS["generation"], "resources": {"actors": 2, "batch_size": 8, "rows_per_block": 20}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(InjectedFault):
        run_job(load_config(path), fail_after_files=3, progress=False)
    settle(out / "data")
    first = pq.read_table(out / "data").column("id").to_pylist()
    assert 0 < len(first) < sum(SIZES)
    recorded = json.loads((out / "_job.json").read_text())["config"]
    assert recorded["model.dtype"] == "float32" and recorded["model.device"] == "cpu", "auto resolved here"

    assert main(["run", "--config", str(path), "--set", "routing.k=3"]) == 2
    err = capsys.readouterr().err
    assert f"the partial run at {out} belongs to a different job (routing.k: 2 -> 3;" in err

    (tmp_path / "elsewhere").mkdir()
    moved = f"{tmp_path}/elsewhere/../in/"  # the same place, written otherwise
    sets = [f"{key}={json.dumps(value)}" for key, value in FLIPPED.items()]
    assert main(["run", "--config", str(path), "--input", moved, *sum((["--set", s] for s in sets), [])]) == 0
    report = capsys.readouterr().out
    assert f"rows {sum(SIZES)}: computed now {sum(SIZES) - len(first)}, resumed {len(first)}" in report
    ids = read_output(str(out)).column("id").to_pylist()
    assert sorted(ids) == sorted(f"k{i:05d}" for i in range(sum(SIZES)))  # every id once


def test_refusal_names_each_differing_key_and_an_old_record_its_hash():
    from pipeline.commit import _same_job
    from pipeline.config_io import changed_keys
    from pipeline.errors import OutputError
    from pipeline.outputs import FORMAT

    assert changed_keys({"routing.k": 2, "input.uri": "/a", "model.dtype": "float32"},
                        {"routing.k": 3, "input.uri": "/a", "model.dtype": "bfloat16"}) == \
        ['model.dtype: "float32" -> "bfloat16"', "routing.k: 2 -> 3"]
    ours = {"format": FORMAT, "config_hash": "a" * 64, "config": {"routing.k": 3}, "input_files": []}
    with pytest.raises(OutputError, match=r"^x belongs to a different job \(routing\.k: 2 -> 3; its value -> this "
                                          r"job's\): set them back to resume it"):
        _same_job(ours, {**ours, "config_hash": "b" * 64, "config": {"routing.k": 2}}, "x")
    old = {"format": FORMAT, "config_hash": "b" * 64, "input_files": []}  # written before the values were recorded
    with pytest.raises(OutputError, match=r"^x belongs to a different job \(configuration hash bbbbbbbbbbbb, this "
                                          r"job aaaaaaaaaaaa\)"):
        _same_job(ours, old, "x")
