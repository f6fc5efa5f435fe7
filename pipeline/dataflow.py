"""The Ray Data dataflow: read slices -> LoGo actors -> write data files, streamed.

    read    PromptSource: one read task per planned slice (`inputs.plan_slices`), one block each
    logo    map_batches(LoGoStage, compute=ActorPoolStrategy(size=actors), batch_size, CPUs/GPUs)
    write   map_batches(outputs.write_part): one new data file per block; yields a summary row

The driver consumes the summary rows as they arrive (progress, and the testing hook that stops
a run after some files to exercise resume). Reads and writes take a quarter CPU each, so they
are never starved by the actors.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import inputs, outputs, storage
from pipeline.config import JobConfig
from pipeline.errors import InjectedFault, StageError
from pipeline.stages import LoGoStage

IO_CPUS = 0.25
"""CPUs reserved by each read or write task."""


class PromptSource(Datasource):
    """A Ray Data source reading the planned slices of the input, one block per slice."""

    def __init__(self, slices: list[inputs.Slice], config: JobConfig):
        super().__init__()
        self.slices, self.config = slices, config

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(_read, piece, self.config),
                     BlockMetadata(num_rows=len(piece.positions), size_bytes=None, exec_stats=None,
                                   input_files=(piece.file.uri,)))
            for piece in self.slices
        ]


def _read(piece: inputs.Slice, config: JobConfig):
    return [inputs.read_slice(piece, config.input, config.storage)]


def ensure_ray(config: JobConfig) -> None:
    """Join the configured Ray cluster (or RAY_ADDRESS, or start a local one) unless joined."""
    if not ray.is_initialized():
        ray.init(address=config.resources.ray_address, logging_level=logging.WARNING)


def actor_resources(config: JobConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per LoGo actor, filling in the defaults (see `ResourcesConfig`)."""
    res = config.resources
    cluster = ray.cluster_resources()
    gpus = res.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    if res.cpus_per_actor is not None:
        return res.cpus_per_actor, gpus
    if gpus > 0:
        return 1.0, gpus
    total = float(cluster.get("CPU", 1.0))
    share = (total - 1.0) / res.actors
    if share >= 1:
        return float(math.floor(share)), 0.0
    return max(0.05, math.floor(share * 20) / 20), 0.0


def compute_statistics(config: JobConfig) -> dict:
    """Calibration statistics computed once, in one task with an actor's resources (its GPU)."""
    from pipeline.calibration import job_statistics

    ensure_ray(config)
    cpus, gpus = actor_resources(config)
    return ray.get(ray.remote(job_statistics).options(num_cpus=cpus, num_gpus=gpus).remote(config))


@dataclass(frozen=True)
class Progress:
    files: int
    """Data files written so far by this attempt."""
    rows: int
    """Rows written so far by this attempt."""
    errors: int
    """Error rows among them."""


def run_dataflow(config: JobConfig, slices: list[inputs.Slice], attempt: str,
                 on_file: Callable[[Progress], None] | None = None,
                 fail_after_files: int | None = None, calibration: dict | None = None) -> Progress:
    """Run the slices through the LoGo actors into new data files under `<output>/data/`."""
    ensure_ray(config)
    cpus, gpus = actor_resources(config)
    res = config.resources
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    ds = ray.data.read_datasource(PromptSource(slices, config), override_num_blocks=len(slices), num_cpus=IO_CPUS)
    stage_args = {"config": config, "calibration": calibration}
    with warnings.catch_warnings():  # Ray 2.60 names max_restarts only among its deprecated **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        ds = ds.map_batches(LoGoStage, fn_constructor_kwargs=stage_args, batch_size=res.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=res.actors),
                            num_cpus=cpus, num_gpus=gpus,
                            # no actor restarts: Ray cannot restart an actor whose constructor arguments
                            # live in the object store (and logs an error saying so); a failed run is
                            # rerun instead, which resumes it
                            max_restarts=0)
    ds = ds.map_batches(outputs.write_part, batch_size=None, batch_format="pyarrow", num_cpus=IO_CPUS,
                        fn_kwargs={"data_uri": data_uri, "config": config.storage, "attempt": attempt})
    files = rows = errors = 0
    stream = iter(ds.iter_rows())
    try:
        for summary in stream:
            files, rows, errors = files + 1, rows + int(summary["rows"]), errors + int(summary["errors"])
            progress = Progress(files, rows, errors)
            if on_file is not None:
                on_file(progress)
            if fail_after_files is not None and files >= fail_after_files:
                raise InjectedFault(f"testing hook: stopping after {files} data files ({rows} rows) were written")
    except ray.exceptions.RayActorError as err:
        if not err.actor_init_failed:
            raise
        # the predictor refused a model, adapter or option: its message is the last line of the report
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise StageError(f"a LoGo actor could not start: {reason} ({files} data files were written before; "
                         "fix it and rerun to resume)") from err
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return Progress(files, rows, errors)
