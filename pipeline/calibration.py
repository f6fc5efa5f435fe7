"""Calibration statistics for a job, computed once on the driver before any actor starts.

Sources (`routing.calibration`): `input` (a seeded random sample of the job's own prompts; the
reference set instead when the input has fewer than `routing.calibration_min_rows` usable prompts,
and the statistics' `source` says so), `reference` (the reference prompt set shipped in
`actors/`), or the path / s3:// URI of a statistics file written by `logo-batch calibrate`. The statistics are handed to every actor as
data, so all actors route with the same numbers, and are recorded in the run's manifest.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

from pipeline import inputs, storage
from pipeline.config import CALIBRATION_SOURCES, ConfigError, InputConfig, JobConfig, StorageConfig
from pipeline.fetch import cache_root, local_copy, pinned_sources

CONFIG_FILE = "adapter_config.json"
"""A PEFT adapter's configuration file (as `actors.adapters.CONFIG_FILE`, without importing torch:
the driver of a job never loads torch; on a Ray Jobs driver a late torch import has crashed)."""


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
              source: str, seed: int | None = None, pins: dict | None = None, **routing):
    """Statistics of every adapter's routing score over `prompts` (or 'reference'), with `routing`
    options; `pins` (a job's `contents`) hold the model and pool to the versions the job pinned."""
    from actors import LoGoPredictor  # torch: only where statistics are computed

    model, adapters, actor_pins = pinned_sources(model, adapters, storage_cfg, pins)
    if actor_pins is not None:
        routing["pins"] = actor_pins
    routing.setdefault("index_cache", cache_root(storage_cfg))  # written for the actors of this node
    predictor = LoGoPredictor(model=model, adapters=adapters, calibration_prompts=prompts,
                              max_new_tokens=1, calibration_score="raw", **routing)
    return replace(predictor.calibration, source=source, seed=seed)


def pool_names(config: JobConfig) -> tuple[str, ...]:
    """The adapter names of the pool, in order, from a listing (no adapter is read)."""
    listed = storage.list_objects(config.adapters.path, config.storage)
    return tuple(sorted({o.key.split("/")[0] for o in listed
                         if o.key.count("/") == 1 and o.key.endswith("/" + CONFIG_FILE) and not o.key.startswith(".")}))


def model_blocks(config: JobConfig) -> int | None:
    """The model's decoder block count from its `config.json` alone (None if it cannot be read)."""
    try:
        data = storage.read_bytes(storage.join(config.model.path, "config.json"), config.storage)
        return int(json.loads(data)["num_hidden_layers"]) if data else None
    except (ValueError, KeyError, TypeError):
        return None


def check_statistics(stats: dict, config: JobConfig) -> None:
    """Statistics fit this job's pool and routing (what the actors check again), checked before a
    run stores them and by validate: the same adapters in the same order, the same signal and probe
    input, and scored pairs of the probed modules at the probed blocks. Raises `ConfigError` naming
    routing.calibration and the fix."""
    r = config.routing
    key = f"routing.calibration: {r.calibration}" if r.calibration not in CALIBRATION_SOURCES else "routing.calibration"
    names, theirs = pool_names(config), tuple(stats.get("adapters") or ())
    if theirs != names:
        missing, extra = sorted(set(names) - set(theirs)), sorted(set(theirs) - set(names))
        order = "" if missing or extra else " (the same names in another order)"
        raise ConfigError(f"{key}: the statistics are for another adapter pool{order} (pool adapters missing from "
                          f"them: {missing[:5]}, extra: {extra[:5]}); recompute them with `logo-batch calibrate` on "
                          f"{config.adapters.path}")
    probe = stats.get("probe") or {}
    for name, want in (("signal", r.signal), ("probe_input", r.probe_input)):
        if probe.get(name) != want:
            raise ConfigError(f"{key}: the statistics were computed with {name}={probe.get(name)!r}, but routing."
                              f"{name} is {want!r}; recompute them with `logo-batch calibrate` and this job's routing")
    pairs = [str(p) for p in probe.get("pairs") or []]
    modules = {p.rsplit(".", 1)[-1] for p in pairs}
    found = {int(m.group(1)) for p in pairs if (m := re.search(r"\.(\d+)\.", p))}
    blocks = model_blocks(config)
    try:
        wanted = set(r.blocks(blocks)) if blocks else None
    except ValueError as err:
        raise ConfigError(f"routing.{err}") from None
    if not pairs or not modules <= set(r.probe_modules) or (wanted is not None and found != wanted):
        raise ConfigError(f"{key}: the statistics score {len(pairs)} (block, module) pairs of {sorted(modules)} at "
                          f"blocks {sorted(found)[:3]}..., but routing probes {list(r.probe_modules)} at probe_layers="
                          f"{r.probe_layers!r}; recompute them with `logo-batch calibrate` and this job's "
                          "probe_layers and probe_module")


def job_statistics(config: JobConfig, pins: dict | None = None) -> dict:
    """The statistics for `config.routing.calibration`, as a plain dict (what every actor receives),
    from the model and pool as `pins` (a job's `contents`) pinned them."""
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
        stats = calibrate(config.model.path, config.adapters.path, prompts, config.storage, source, seed, pins,
                          routing=replace(config.routing.actor_options(), calibration_score="raw",
                                          min_confidence=None, uncertain_below=None),
                          dtype=config.model.dtype, device=config.model.device,
                          max_resident=config.adapters.max_resident)
    else:
        from actors.calibration import CalibrationStats

        try:
            stats = CalibrationStats.load(local_copy(r.calibration, config.storage))
        except ValueError as err:
            raise ConfigError(f"routing.calibration: {err}") from None
    return json.loads(stats.to_json())
