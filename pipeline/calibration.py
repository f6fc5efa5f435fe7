"""Calibration statistics for a job, computed once on the driver before any actor starts.

Sources (`routing.calibration`): `input` (a seeded random sample of the job's own prompts; the
reference set instead when the input has fewer than `routing.calibration_min_rows` usable prompts,
and the statistics' `source` says so), `reference` (the task-neutral prompt set shipped in
`actors/`), or the path / s3:// URI of a statistics file written by `logo-batch calibrate`. The statistics are handed to every actor as
data, so all actors route with the same numbers, and are recorded in the run's manifest.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

from actors import LoGoPredictor
from actors.calibration import CalibrationStats
from pipeline import inputs
from pipeline.config import CALIBRATION_SOURCES, InputConfig, JobConfig, StorageConfig
from pipeline.fetch import local_copy


def sample_prompts(cfg: InputConfig, storage_cfg: StorageConfig, size: int, seed: int) -> list[str]:
    """`size` prompts drawn uniformly without replacement from every input row (seeded)."""
    files = inputs.discover(cfg, storage_cfg)
    total = inputs.total_rows(files)
    picks = sorted(random.Random(seed).sample(range(total), min(size, total)))
    prompts, offset = [], 0
    for f in files:
        rows = tuple(p - offset for p in picks if offset <= p < offset + f.rows)
        offset += f.rows
        if rows:
            table = inputs.read_slice(inputs.Slice(f, rows, tuple(map(str, rows))), cfg, storage_cfg)
            prompts.extend(v for v in table.column(cfg.prompt_column).to_pylist() if isinstance(v, str) and v.strip())
    return prompts


def calibrate(model: str, adapters: str, prompts: list[str] | str, storage_cfg: StorageConfig,
              source: str, seed: int | None = None, **routing) -> CalibrationStats:
    """Statistics of every adapter's routing score over `prompts` (or 'reference'), with `routing` options."""
    predictor = LoGoPredictor(model=local_copy(model, storage_cfg), adapters=local_copy(adapters, storage_cfg),
                              calibration_prompts=prompts, max_new_tokens=1, calibration_score="raw", **routing)
    return replace(predictor.calibration, source=source, seed=seed)


def job_statistics(config: JobConfig) -> dict:
    """The statistics for `config.routing.calibration`, as a plain dict (what every actor receives)."""
    r = config.routing
    if r.calibration in CALIBRATION_SOURCES:
        prompts: list[str] | str = "reference"
        source, seed = "reference", None
        if r.calibration == "input":
            sample = sample_prompts(config.input, config.storage, r.calibration_sample, r.calibration_seed)
            if len(sample) >= r.calibration_min_rows:
                prompts, source, seed = sample, f"input sample of {config.input.uri}", r.calibration_seed
            else:
                source = (f"reference (the input has {len(sample)} usable prompts, fewer than "
                          f"routing.calibration_min_rows={r.calibration_min_rows})")
        stats = calibrate(config.model.path, config.adapters.path, prompts, config.storage, source, seed,
                          routing=replace(config.routing.actor_options(), calibration_score="raw"),
                          dtype=config.model.dtype, device=config.model.device,
                          max_resident=config.adapters.max_resident)
    else:
        stats = CalibrationStats.load(local_copy(r.calibration, config.storage))
    return json.loads(stats.to_json())
