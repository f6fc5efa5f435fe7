"""Pipeline test fixtures and helpers: tiny model and adapter pool, one local Ray runtime, prompt
files, job configurations, and the in-process reference the pipeline's rows are compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors import LoGoPredictor
from pipeline import JobConfig, config_from_dict
from tests.tiny import tiny_adapter, tiny_model_dir

ADAPTERS = ("arith", "copy", "shout", "spell")
SIZES = (80, 70, 60)  # 210 rows in 3 files
# The default routing, with the in-process predictor's default statistics (the shipped reference
# set), so that a job's rows can be compared with `LoGoPredictor` in this process.
OPTIONS = {"routing": {"k": 2, "calibration": "reference"}, "generation": {"max_new_tokens": 3}}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, adapter pool directory) of a tiny random Llama and four adapters."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model_dir(root / "model", hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    for seed, name in enumerate(ADAPTERS, start=1):
        tiny_adapter(model, root / "pool" / name, r=2, seed=seed)
    return model, root / "pool"


def prompt(i: int) -> str:
    return f"q{i}: add {i % 7} and {i % 5}"


def write_prompts(directory: Path, sizes: tuple[int, ...], *, row_group_size: int = 25,
                  extra: dict[str, list] | None = None) -> list[str]:
    """Parquet files part-0..N of prompts (and a `task` column); returns all prompts in order."""
    directory.mkdir(parents=True, exist_ok=True)
    prompts, start = [], 0
    for index, size in enumerate(sizes):
        texts = [prompt(i) for i in range(start, start + size)]
        table = pa.table({"prompt": texts, "task": [f"t{i % 3}" for i in range(start, start + size)],
                          "key": [f"k{i:05d}" for i in range(start, start + size)]})
        pq.write_table(table, directory / f"part-{index}.parquet", row_group_size=row_group_size)
        prompts += texts
        start += size
    return prompts


def job(model: Path | str, pool: Path | str, input_uri: str, output_uri: str, **sections) -> JobConfig:
    """A job configuration for the tiny assets: 2 actors, batches of 8."""
    data = {"model": {"path": str(model)}, "adapters": {"path": str(pool)}, "input": {"uri": input_uri},
            "output": {"uri": output_uri}, "resources": {"actors": 2, "batch_size": 8}, **OPTIONS}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


def reference(model, pool, prompts: list[str]) -> dict:
    """What LoGoPredictor gives for these prompts in this process."""
    predictor = LoGoPredictor(model=str(model), adapters=str(pool), k=OPTIONS["routing"]["k"],
                              max_new_tokens=OPTIONS["generation"]["max_new_tokens"])
    return predictor({"prompt": np.array(prompts, dtype=object)})


def assert_matches_reference(table: pa.Table, ref: dict, order: list[str]) -> None:
    """Rows of `table` (by id, in `order`) equal the reference predictor's rows, in the same order."""
    rows = {r["id"]: r for r in table.to_pylist()}
    for i, row_id in enumerate(order):
        row = rows[row_id]
        assert row["error"] is None, (row_id, row["error"])
        assert row["output"] == ref["output"][i], row_id
        assert row["adapters"] == list(ref["adapters"][i]), row_id
        np.testing.assert_allclose(row["weights"], ref["weights"][i], rtol=0, atol=1e-5, err_msg=row_id)
        assert row["prompt_tokens"] == ref["prompt_tokens"][i]


def settle(directory: Path, quiet: float = 2.0) -> None:
    """Wait until the files in `directory` stop changing: after a fault injected in this process,
    writes the stopped dataflow had in flight land first (a crashed driver's job would be gone)."""
    import time

    last = None
    while True:
        now = sorted((p.name, p.stat().st_size) for p in directory.iterdir()) if directory.exists() else []
        if now == last:
            return
        last = now
        time.sleep(quiet)
