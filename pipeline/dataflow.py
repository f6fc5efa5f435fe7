"""The Ray Data dataflow: read slices -> LoGo actors -> write data files, streamed.

    read    PromptSource: one read task per read unit (`inputs.plan_reads`): it decodes its row
            groups once and yields one block per slice; small units of several files are packed
            into one read task and one block (`packs.pack_units`)
    logo    map_batches(LoGoStage, compute=ActorPoolStrategy(size=actors), CPUs/GPUs): one call per
            block, which the actor routes whole and generates in batches of `batch_size` rows
            formed by `generation.ordering` (see actors.batching)
    write   map_batches(outputs.write_part): one new data file per block; yields a summary row

The driver consumes the summary rows as they arrive (progress, and the testing hook that stops
a run after some files to exercise resume). Reads and writes take a quarter CPU each, so they
are never starved by the actors, and the actors keep the rest. Blocks are at most
`rows_per_block` rows (a few batches each), and Ray Data's streaming executor holds reads back
when the actors fall behind (the object store does not fill with blocks waiting for them).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import inputs, outputs, packs, resources, storage, watchdog
from actors.fingerprint import ChangedFileError
from pipeline.config import ConfigError, JobConfig
from pipeline.errors import InjectedFault, OutputError, StageError
from pipeline.errors import cause_in as _cause
from pipeline.lease import Lease, LeaseLost
from pipeline.stages import LoGoStage

log = logging.getLogger(__name__)

IO_CPUS = 0.25
"""CPUs reserved by each read or write task."""


class PromptSource(Datasource):
    """A Ray Data source reading the planned read units of the input, one block per slice."""

    def __init__(self, tasks: list[packs.Task], config: JobConfig):
        super().__init__()
        self.tasks, self.config = tasks, config

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(packs.read_task, task, self.config.input, self.config.storage),
                     BlockMetadata(num_rows=task.rows, size_bytes=None, exec_stats=None,
                                   input_files=packs.uris(task)))
            for task in self.tasks
        ]


def ray_address(config: JobConfig) -> str:
    """Where the job's Ray is: `resources.ray_address`, else RAY_ADDRESS, else `local`: a new Ray
    of this machine, never a cluster some earlier Ray left in its `ray_current_cluster` file."""
    return config.resources.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray(config: JobConfig) -> None:
    """Join the configured Ray cluster (or RAY_ADDRESS, or start a local one) unless joined. A
    local Ray this driver starts is watched (`pipeline.watchdog`): if the driver is killed, the
    processes Ray started for it are stopped too."""
    if not ray.is_initialized():
        before = watchdog.children()
        address = ray_address(config)
        print("logo-batch: starting a Ray of this machine" if address == "local" else
              f"logo-batch: joining the Ray cluster at {address}", file=sys.stderr, flush=True)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=_log_to_driver())
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None and getattr(node, "head", False):
            watchdog.watch(os.getpid(), watchdog.children() - before)
    quiet_ray_data()


def remote(fn: Callable, **options):
    """`fn` as a Ray task with these options: this module is the pipeline's one place for the Ray API
    (`pipeline.ids` runs its tasks through it, then `get`s their results)."""
    return ray.remote(fn).options(**options)


get = ray.get


def cluster_growth() -> resources.Growth | None:
    """What the joined cluster's autoscaler can add: the node kinds it reports (Ray's autoscaler v2,
    as KubeRay runs it, puts them in the cluster's configuration), `Growth(known=False)` when an
    autoscaler runs without reporting them (v1 writes only its status, naming the node kinds of its
    config), None without one (a Ray without an autoscaling config reports its nodes as read-only
    kinds `node_<id>`, which nothing adds)."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:  # Ray's own reading of it (Ray Data's autoscaling asks the same); not a public API
        config = ray._private.state.state.get_cluster_config()
        status = _internal_kv_get(ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001 - a Ray that cannot say is checked as one without an autoscaler
        return None
    if config is not None and config.node_group_configs:
        groups = tuple(resources.NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                       for g in config.node_group_configs if g.max_count != 0 and g.resources)
        return resources.Growth(groups) if groups else None
    report = json.loads(status).get("autoscaler_report") if status else None
    types = (report or {}).get("node_type_mapping") or {}
    if types and any(kind != f"node_{node}" for node, kind in types.items()):
        return resources.Growth(known=False)  # node kinds of an autoscaling config, not the read-only "node_<id>"
    return None


def fit_cluster(config: JobConfig, actors: int, cpus: float, gpus: float, io_cpus: float) -> None:
    """`resources.check_cluster` on the joined cluster and what its autoscaler can add; says on
    stderr when the job waits for nodes."""
    message = resources.check_cluster(actors, cpus, gpus, io_cpus, ray.nodes(), cluster_growth())
    if message:
        print(f"logo-batch: {message}", file=sys.stderr, flush=True)


def _growable_gpus() -> float:
    growth = cluster_growth()
    return sum(g.resources.get("GPU", 0.0) for g in growth.groups) if growth is not None else 0.0


def cluster_gpus(config: JobConfig) -> float:
    """GPUs of the Ray cluster the job runs on: asked of the cluster when this process has joined one
    or is to join one (resources.ray_address, RAY_ADDRESS: joined first); for the local Ray the job
    would start, the GPUs Ray's own detector finds on this machine (what that Ray will report), so
    that nothing starts before the job's first checks."""
    if ray.is_initialized() or config.resources.ray_address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(config)
        return float(ray.cluster_resources().get("GPU", 0)) + _growable_gpus()
    from ray._private.accelerators import get_accelerator_manager_for_resource

    return float(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())


def actor_resources(config: JobConfig) -> tuple[float, float]:
    """(CPUs, GPUs) per LoGo actor, filling in the defaults (see `ResourcesConfig`)."""
    res = config.resources
    cluster = ray.cluster_resources()
    gpus = res.gpus_per_actor
    if gpus is None:  # GPUs if the cluster has them or its autoscaler can add them
        gpus = 1.0 if cluster.get("GPU", 0) + _growable_gpus() >= 1 else 0.0
    if res.cpus_per_actor is not None:
        return res.cpus_per_actor, gpus
    if gpus > 0:
        return 1.0, gpus
    total = float(cluster.get("CPU", 1.0))
    share = (total - 1.0) / res.actors
    if share >= 1:
        return float(math.floor(share)), 0.0
    return max(0.05, math.floor(share * 20) / 20), 0.0


def slice_sized(ds: "ray.data.Dataset", rows: int) -> "ray.data.Dataset":
    """`ds` in blocks of at most `rows` rows, split by tasks of IO_CPUS CPUs. Ray 2.60's streaming
    repartition takes no resource argument and its tasks ask for 1 CPU, which a node whose CPUs
    the actors hold in fractions never has free: the job would wait for it forever."""
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = IO_CPUS  # the operator just added
    return ds


def compute_statistics(config: JobConfig, pins: dict | None = None) -> dict:
    """Calibration statistics computed once, in one task with an actor's resources (its GPU), from
    the model and pool as `pins` (a job's `contents`) pinned them."""
    from pipeline.calibration import job_statistics

    ensure_ray(config)
    cpus, gpus = actor_resources(config)
    fit_cluster(config, 1, cpus, gpus, 0)
    try:
        return ray.get(ray.remote(job_statistics).options(num_cpus=cpus, num_gpus=gpus).remote(config, pins))
    except ray.exceptions.RayTaskError as err:
        stop = _cause(err, (*STOPS, ConfigError))
        if stop is not None:
            raise _one_line(stop) from None
        if not isinstance(err.cause, ValueError):  # a refused model, adapter or option; others stay as they are
            raise
        # the same predictor an actor builds refused: say so as an actor's refusal, before any row ran
        raise StageError(f"a LoGo actor could not start: {err.cause} (while computing the calibration "
                         "statistics; no row was computed)") from err


@dataclass(frozen=True)
class Progress:
    files: int
    """Data files written so far by this attempt."""
    rows: int
    """Rows written so far by this attempt."""
    errors: int
    """Error rows among them."""
    decoded: int = 0
    """Input rows the read tasks decoded for them."""
    first_file_seconds: float | None = None
    """Seconds from the dataflow's start to its first data file."""


def _log_to_driver() -> bool:
    """Workers' output reaches the driver only when LOGO_BATCH_WORKER_LOGS=1 (debugging): an actor's
    library warnings are not the user's business, and a failure reaches the driver as an exception."""
    return os.environ.get("LOGO_BATCH_WORKER_LOGS", "") == "1"


class _QuietRayData(logging.Filter):
    """Ray Data's informational lines (a `take_batch()` tip, `Progress bars disabled`, each
    dataset's `execution finished`) dropped from the driver; its warnings and errors kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING
                                                   and not text.startswith("Progress bars disabled"))


def quiet_ray_data() -> None:
    """Ray Data's own progress bars and per-operator blocks off (the job prints `ProgressLine`), its
    informational lines dropped, and no traceback from it for a task that stopped the run on purpose
    (`STOPS`)."""
    executor_log = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    if not any(isinstance(f, _QuietStops) for f in executor_log.filters):
        executor_log.addFilter(_QuietStops())
    data_log = logging.getLogger("ray.data")
    for handler in [*data_log.handlers, *logging.getLogger("ray").handlers]:
        if not any(isinstance(f, _QuietRayData) for f in handler.filters):
            handler.addFilter(_QuietRayData())
    if not any(isinstance(f, _QuietRayData) for f in data_log.filters):
        data_log.addFilter(_QuietRayData())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


STOPS = (LeaseLost, ChangedFileError)
"""What a task may raise that stops the run with its own one-line message (exit 2)."""


def _one_line(err: BaseException) -> BaseException:
    """What the user is told of a stop a task raised: its own message, without Ray's traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if not line.startswith(("File ", "Traceback", "^"))), str(err))
    message = message.split(": ", 1)[1] if message.startswith(type(err).__name__ + ":") else message
    if isinstance(err, ConfigError):
        return ConfigError(message)
    return (LeaseLost if isinstance(err, LeaseLost) else OutputError)(message)


class _QuietStops(logging.Filter):
    """Drops Ray Data's traceback of a task that raised one of `STOPS`: the driver says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return failure is None or _cause(failure, STOPS) is None


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows the actors have finished (generated, or made error rows), told after every generation
    batch: the driver's progress line counts from it, not only from data files written."""

    def __init__(self):
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


class Heartbeat:
    """A driver thread that calls `report(rows done)` every `every` seconds while the dataflow runs,
    with the actors' count (`RowCounter`), so progress shows during long blocks and before the first."""

    def __init__(self, report: Callable[[int], None], every: float):
        import threading

        self.report, self.every = report, every
        self.counter = RowCounter.remote()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="logo-batch-progress", daemon=True)

    def _run(self) -> None:
        rows = 0
        while not self.stop.wait(self.every):
            try:
                rows = ray.get(self.counter.get.remote(), timeout=self.every)
            except Exception:  # a slow answer: the count known so far
                pass
            if not self.stop.is_set():
                self.report(rows)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=self.every + 1)


def run_dataflow(config: JobConfig, files: list[inputs.InputFile], tasks: list[packs.Task], attempt: str,
                 on_file: Callable[[Progress], None] | None = None,
                 fail_after_files: int | None = None, calibration: dict | None = None,
                 pins: dict | None = None, lease: Lease | None = None,
                 heartbeat: Callable[[int], None] | None = None, heartbeat_every: float = 9.0) -> Progress:
    """Run the read tasks (`packs.pack_units`) through the LoGo actors into new data files under `<output>/data/`.

    `pins` (`_job.json`'s contents) go to every actor, which checks each model and adapter file
    against them as it reads it; with `lease`, every write task checks that the lease is still this
    driver's before it writes, and the driver checks it after every file, so a driver that lost its
    lease stops its dataflow at once (`LeaseLost`). `heartbeat(rows)` is called every
    `heartbeat_every` seconds with the rows the actors have finished."""
    ensure_ray(config)
    started = time.monotonic()
    cpus, gpus = actor_resources(config)
    res = config.resources
    fit_cluster(config, res.actors, cpus, gpus, IO_CPUS)
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    blocks = sum(packs.blocks(t) for t in tasks)
    ds = ray.data.read_datasource(PromptSource(tasks, config), override_num_blocks=len(tasks), num_cpus=IO_CPUS)
    # a read task's slices would be merged into one block of up to 128 MiB: keep blocks slice-sized
    block_rows = max(packs.block_rows(t) for t in tasks)
    ds = slice_sized(ds, block_rows)
    beat = Heartbeat(heartbeat, heartbeat_every) if heartbeat is not None else None
    stage_args = {"config": config, "calibration": calibration, "pins": pins,
                  "counter": None if beat is None else beat.counter}
    with warnings.catch_warnings():  # Ray 2.60 names max_restarts only among its deprecated **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        # a whole block per call; Ray Data wants a number with GPUs: no block is larger than block_rows
        ds = ds.map_batches(LoGoStage, fn_constructor_kwargs=stage_args, batch_size=block_rows if gpus > 0 else None,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=res.actors),
                            num_cpus=cpus, num_gpus=gpus, **resources.ACTOR_OPTIONS)
    names = tuple(f.name for f in files)
    ds = ds.map_batches(outputs.write_part, batch_size=None, batch_format="pyarrow", num_cpus=IO_CPUS,
                        fn_kwargs={"data_uri": data_uri, "config": config.storage, "attempt": attempt,
                                   "names": names, "lease": None if lease is None else (lease.uri, lease.owner)})
    log.debug("dataflow: %d read tasks, %d blocks", len(tasks), blocks)
    progress = Progress(0, 0, 0)
    print(f"logo-batch: starting {res.actors} LoGo actor{'s' * (res.actors != 1)} ({cpus:g} CPUs, {gpus:g} GPUs "
          "each: loading the model and the adapter pool)", file=sys.stderr, flush=True)
    stream = iter(ds.iter_rows())
    if beat is not None:
        beat.__enter__()
    try:
        for summary in stream:
            first = progress.first_file_seconds
            progress = Progress(progress.files + 1, progress.rows + int(summary["rows"]),
                                progress.errors + int(summary["errors"]), progress.decoded + int(summary["decoded"]),
                                round(time.monotonic() - started, 3) if first is None else first)
            if lease is not None and lease.lost is not None:
                lease.check()  # raises: the renewal found the lease lost
            if on_file is not None:
                on_file(progress)
            if fail_after_files is not None and progress.files >= fail_after_files:
                raise InjectedFault(f"testing hook: stopping after {progress.files} data files "
                                    f"({progress.rows} rows) were written")
    except Exception as err:
        stop = _cause(err, STOPS)
        if stop is not None:
            raise _one_line(stop) from None
        if not isinstance(err, ray.exceptions.RayActorError) or not err.actor_init_failed:
            raise
        # the predictor refused a model, adapter or option: its message is the last line of the report
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        if ChangedFileError.__name__ in reason:  # a pinned file changed: an output problem, not a bad option
            raise OutputError(reason.split(f"{ChangedFileError.__name__}: ", 1)[-1]) from None
        raise StageError(f"a LoGo actor could not start: {reason} ({progress.files} data files were written "
                         "before; fix it and rerun to resume)") from err
    finally:
        if beat is not None:
            beat.__exit__()
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return progress
