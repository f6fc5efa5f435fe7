"""`run_job(config) -> RunReport`: the typed entry point of a batch job, start to commit.

    committed already? (`_SUCCESS`, `_job.json`,       -> nothing else is read; input changed since:
      an input listing against its pins)                 refused, naming the files
    check input (files, columns, ids) and sources      -> nothing runs if any is wrong
    take the output's lease                            -> `lease.Lease`: one driver per output; every
                                                          delete, write and the commit checks it first
    claim the output (another job? resume?)            -> `commit.open_run`, with the run's calibration
                                                          statistics pinned (`_calibration.json`)
    read the data files' footers                       -> the row ranges already written
    (--retry-errors: copy the files with error rows    -> the committed run stays whole until the new
      less those rows; nothing deleted)                   manifest replaces it)
    plan read units and slices for the rest            -> `inputs.plan_reads`, from metadata only
    run the dataflow on them                           -> `dataflow.run_dataflow`: actors check every
                                                          model and adapter file against the pins
    read the footers again, verify exactly-once per row range, manifest, _SUCCESS

The driver holds the file list, the plan (a few numbers per slice) and one record per data file:
nothing per row.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pipeline import bounds, commit, inputs, outputs, packs, storage
from pipeline.calibration import check_statistics
from pipeline.config import ConfigError, JobConfig
from pipeline.errors import TooManyErrors, too_many
from pipeline.lease import Lease, LeaseLost
from pipeline.outputs import PartFile
from pipeline.placement import placed
from pipeline.report import ProgressLine, RunReport, build_manifest, build_report, report_from_manifest

log = logging.getLogger(__name__)


def new_attempt_id() -> str:
    """Sortable by time, unique: `20261128T163000Z-1a2b3c`."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def check_sources(config: JobConfig) -> None:
    """The model, adapter pool and calibration file exist, and a bytes `max_resident` holds the k
    largest adapters (cheap checks, before any actor)."""
    named = [("model.path", config.model.path), ("adapters.path", config.adapters.path)]
    if config.routing.calibration not in (None, "input", "reference"):
        named.append(("routing.calibration", config.routing.calibration))
    for key, uri in named:
        if not storage.exists(uri, config.storage):
            raise ConfigError(f"{key}: nothing at {uri!r}; check the path (and storage.endpoint for s3://)")
    out, inp = (storage.normal_uri(u) for u in (config.output.uri, config.input.uri))
    if out == inp or out.startswith(inp + "/") or inp.startswith(out + "/"):
        raise ConfigError(f"output.uri {config.output.uri!r} overlaps input.uri {config.input.uri!r}: the run's data "
                          "files would be read as input; choose an output outside the input")
    bounds.check_residency(config)  # the actor's check, before any actor


def statistics_for(config: JobConfig) -> Callable[[dict], dict | None]:
    """How a new run gets its calibration statistics (None without calibration): computed once
    (in one Ray task) from the model and pool as pinned, or read from the configured file, then
    checked against the pool, before `commit.open_run` stores them as `_calibration.json`."""
    def compute(contents: dict) -> dict | None:
        if config.routing.calibration is None:
            return None
        from pipeline.dataflow import compute_statistics  # imports Ray

        print(f"logo-batch: calibrating: routing-score statistics of every adapter from "
              f"{_calibration_source(config)} (once per run; stored in _calibration.json)", file=sys.stderr, flush=True)
        stats = compute_statistics(config, contents)
        check_statistics(stats, config)
        return stats

    return compute


def _calibration_source(config: JobConfig) -> str:
    setting = config.routing.calibration
    if setting == "input":
        return f"a sample of up to {config.routing.calibration_sample} of this job's prompts"
    return "the shipped reference prompts" if setting == "reference" else str(setting)


def check_ids(config: JobConfig, files: list[inputs.InputFile]) -> None:
    """A configured id column has no null and no duplicate (counted in the cluster)."""
    if config.input.id_column is None:
        return
    print(f"logo-batch: checking ids: column {config.input.id_column!r} of {inputs.total_rows(files):,} rows for "
          "nulls and duplicates", file=sys.stderr, flush=True)
    inputs.check_nulls(files, config.input, config.storage)
    from pipeline.ids import duplicate_ids  # imports Ray

    repeated = duplicate_ids(config, files)
    if repeated:
        raise inputs.duplicate_error(files, repeated, config.input, config.storage)


@dataclass(frozen=True)
class Plan:
    """What a run of the job would do now (see `plan`)."""

    files: list[inputs.InputFile]
    """The input files."""
    parts: list[PartFile]
    """Data files already written by earlier attempts."""
    units: list[inputs.ReadUnit]
    """Read units for the rows still to do (one file each)."""
    rows_per_block: int
    """Rows per slice (block)."""

    @functools.cached_property
    def tasks(self) -> list[packs.Task]:
        """The read tasks: the units, small ones packed into one block (`packs.pack_units`)."""
        return packs.pack_units(self.units, self.rows_per_block)

    @property
    def total(self) -> int:
        return inputs.total_rows(self.files)

    @property
    def remaining(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def slices(self) -> int:
        return sum(len(u.slices) for u in self.units)

    @property
    def blocks(self) -> int:
        return sum(packs.blocks(t) for t in self.tasks)

    def describe(self) -> str:
        groups = sum(len(f.row_groups) for f in self.files)
        decoded = sum(u.decoded_rows for u in self.units)
        return (f"{self.remaining:,} of {self.total:,} rows to compute ({self.total - self.remaining:,} already "
                f"written in {len(self.parts)} data files); {len(self.files)} input files, {groups} row groups; "
                f"{len(self.tasks)} read tasks, {self.slices} slices of up to {self.rows_per_block} rows"
                f"{'' if self.blocks == self.slices else f' in {self.blocks} blocks (small ones packed)'}; "
                f"rows to decode {decoded:,}")


def plan(config: JobConfig, files: list[inputs.InputFile], *, repair: bool = True,
         parts: list[PartFile] | None = None) -> Plan:
    """Read units for the rows no data file holds yet (`parts`: the run's data files, else scanned,
    a committed manifest's files first). `repair=False` leaves partial files alone (a dry run)."""
    if parts is None:
        data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
        parts = outputs.scan(data_uri, config.storage, repair=repair, prefer=commit.committed_files(config))
    done = outputs.done_ranges(parts)
    res = config.resources
    remaining = inputs.total_rows(files) - sum(p.rows for p in parts)
    rows_per_block = res.rows_per_block or inputs.default_rows_per_block(remaining, res.actors, res.batch_size)
    return Plan(files, parts, inputs.plan_reads(files, done, rows_per_block), rows_per_block)


def check_errors(config: JobConfig, parts: list[PartFile], total: int) -> None:
    """Raise `TooManyErrors` when more than `run.max_error_fraction` of the rows are error rows."""
    errors = sum(p.errors for p in parts)
    limit = config.run.max_error_fraction
    if too_many(errors, total, limit):
        reasons = sum((p.error_reasons for p in parts), start=Counter())
        reason, count = reasons.most_common(1)[0]
        raise TooManyErrors(
            f"{errors:,} of {total:,} rows ({errors / total:.1%}) have an error, more than run.max_error_fraction="
            f"{limit}; the run is not committed and every row written is kept. Most common ({count:,} rows): "
            f"{reason!r}. Fix the cause and rerun with --retry-errors to recompute only the error rows, or accept "
            "them with --set run.max_error_fraction=<higher>")


def run_job(config: JobConfig, *, fail_after_files: int | None = None, progress: bool = True,
            retry_errors: bool = False, replace: bool = False) -> RunReport:
    """Run (or resume, or confirm) the job; return its report once the output is committed.

    `retry_errors` computes the error rows of the run again (committed or not), each exactly once,
    keeping every other row, on a copy: the files it replaces are deleted only once its new
    manifest is in place, so a retry that fails leaves a committed run exactly as it was.
    `replace` computes a committed run again (any configuration) while it stays readable: its data
    files are set aside, every row is computed into new ones, and the old files are deleted only
    once the new manifest and `_SUCCESS` replace the old ones (`logo-batch nightly --force`); an
    output that is not committed runs as usual.
    `fail_after_files` is a testing hook: the run stops with `InjectedFault` once that many data
    files were written, leaving a partial output for a rerun to resume.
    """
    started = time.time()
    attempt = new_attempt_id()
    config = placed(config)  # `auto` dtype and device made concrete: hashed and run as resolved
    if not config.output.overwrite and not retry_errors and not replace:
        committed = commit.committed_manifest(config)
        if committed is not None:
            return _nothing_to_do(config, committed, started, attempt)
    files = inputs.discover(config.input, config.storage)
    check_ids(config, files)
    check_sources(config)
    held = Lease(config, attempt)
    held.acquire()  # before anything at the output is written or deleted
    try:
        if replace and commit.committed_files(config, any_job=True):
            return _replace(config, files, attempt, started, held, fail_after_files=fail_after_files,
                            progress=progress)
        return _run(config, files, attempt, started, held, retry_errors=retry_errors,
                    fail_after_files=fail_after_files, progress=progress)
    finally:
        held.release()


def _nothing_to_do(config: JobConfig, committed: dict, started: float, attempt: str) -> RunReport:
    print(f"logo-batch: {config.output.uri} is already committed; nothing to do", file=sys.stderr)
    return report_from_manifest(committed, started, attempt)


def _run(config: JobConfig, files: list[inputs.InputFile], attempt: str, started: float, held: Lease, *,
         retry_errors: bool, fail_after_files: int | None, progress: bool) -> RunReport:
    guard = held.check  # before every write, delete and rename at the output
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    if config.output.overwrite:
        guard()
        removed = commit.clear(config)
        log.info("overwrite: removed %d data files at %s", removed, config.output.uri)
    committed = commit.committed_manifest(config)  # again, under the lease: another driver may have committed
    if committed is not None and not retry_errors:
        return _nothing_to_do(config, committed, started, attempt)
    record, stats = commit.open_run(config, files, statistics_for(config), guard)
    keep = commit.committed_files(config)
    parts = outputs.scan(data_uri, config.storage, guard=guard, prefer=keep)
    if not retry_errors:
        return _compute(config, files, attempt, started, held, record, stats, parts, keep, [],
                        fail_after_files=fail_after_files, progress=progress)
    if committed is not None and not any(p.errors for p in parts):
        print("logo-batch: the committed run has no error rows; nothing to retry", file=sys.stderr)
        return report_from_manifest(committed, started, attempt)
    copies, replaced = outputs.copy_without_errors(data_uri, parts, config.storage, guard)
    print(f"logo-batch: retrying {sum(p.errors for p in parts if p.name in replaced):,} error rows",
          file=sys.stderr, flush=True)
    parts = [p for p in parts if p.name not in replaced] + copies
    try:
        return _compute(config, files, attempt, started, held, record, stats, parts, keep, replaced,
                        fail_after_files=fail_after_files, progress=progress)
    except Exception:
        if committed is not None and commit.committed_files(config) == keep:  # the old run stands: as it was
            _remove_retry_files(config, {c.name for c in copies}, attempt, guard)
        raise


def _replace(config: JobConfig, files: list[inputs.InputFile], attempt: str, started: float, held: Lease, *,
             fail_after_files: int | None, progress: bool) -> RunReport:
    """`run_job(replace=True)` on a committed output: the committed run's `_SUCCESS`, manifest and
    data files stay as they are (readers see the old run) while the new run claims the output and
    computes every row; its commit replaces the manifest, then the marker, then deletes the old files."""
    guard = held.check
    old = sorted(commit.committed_files(config, any_job=True))
    theirs = outputs.read_json(storage.join(config.output.uri, outputs.JOB_RECORD), config.storage)
    if theirs is not None and theirs.get("config_hash") == commit.committed_hash(config):
        # the committed run's own claim (readers need neither file), and whatever an interrupted
        # replacement of the same configuration wrote beside its files: computed again
        data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
        for obj in storage.list_objects(data_uri, config.storage):
            if obj.key not in old:
                guard()
                storage.delete(storage.join(data_uri, obj.key), config.storage)
        for name in (outputs.JOB_RECORD, outputs.CALIBRATION):
            guard()
            storage.delete(storage.join(config.output.uri, name), config.storage)
    # else: an interrupted replacement by another configuration claimed the output: open_run resumes it
    record, stats = commit.open_run(config, files, statistics_for(config), guard, ignore=old)
    parts = outputs.scan(storage.join(config.output.uri, outputs.DATA_DIR), config.storage, guard=guard, ignore=old)
    print(f"logo-batch: computing {config.output.uri} again; its committed run stays readable until this one "
          "commits", file=sys.stderr, flush=True)
    return _compute(config, files, attempt, started, held, record, stats, parts, set(), old,
                    fail_after_files=fail_after_files, progress=progress, replace_marker=True)


def _remove_retry_files(config: JobConfig, copies: set[str], attempt: str, guard: Callable[[], None]) -> None:
    """Delete what a failed retry wrote next to the committed run it left as it was (a retry that
    crashed leaves them for the next one, whose scan keeps the manifest's files first)."""
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    made = copies | {o.key for o in storage.list_objects(data_uri, config.storage)
                     if o.key.startswith("part-") and outputs.attempt_of(o.key) == attempt}
    try:
        for name in sorted(made):
            guard()
            storage.delete(storage.join(data_uri, name), config.storage)
    except LeaseLost:
        pass  # another driver holds the output now: its files are not ours to delete


def _compute(config: JobConfig, files: list[inputs.InputFile], attempt: str, started: float, held: Lease,
             record: dict, stats: dict | None, parts: list[PartFile], keep: set[str], replaced: list[str], *,
             fail_after_files: int | None, progress: bool, replace_marker: bool = False) -> RunReport:
    """Compute the rows `parts` leave out, then verify, check the errors and commit (the data files
    named `replaced` are left out of the run and deleted once its manifest no longer lists them)."""
    guard = held.check
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    work = plan(config, files, parts=parts)
    phases = {"plan_seconds": round(time.time() - started, 3)}
    computed = 0
    if work.units:
        from pipeline.dataflow import run_dataflow  # imports Ray only when there is work

        t0 = time.time()
        print(f"logo-batch: {work.describe()}", file=sys.stderr, flush=True)
        from pipeline import report as progress_settings

        every = progress_settings.PROGRESS_EVERY
        line = ProgressLine(work.remaining, every=every) if progress else None
        done = run_dataflow(config, files, work.tasks, attempt, fail_after_files=fail_after_files,
                            on_file=(lambda p: line.update(p.rows)) if line else None, calibration=stats,
                            pins=record["contents"], lease=held,
                            heartbeat=(lambda rows: line.update(rows, force=True)) if line else None,
                            heartbeat_every=every)
        if line is not None:
            line.update(done.rows, final=True)
        computed = done.rows
        phases["dataflow_seconds"] = round(time.time() - t0, 3)
        phases["first_file_seconds"] = done.first_file_seconds
    parts = outputs.scan(data_uri, config.storage, guard=guard, prefer=keep - set(replaced), ignore=replaced)
    commit.verify(parts, files)
    check_errors(config, parts, inputs.total_rows(files))
    report = build_report(config, parts, attempt, started, computed)
    manifest = build_manifest(config, files, parts, report, started)
    manifest["timings"].update(phases)
    if stats is not None:
        manifest["calibration"] = {"file": outputs.CALIBRATION, "setting": config.routing.calibration,
                                   "score": config.routing.calibration_score, "source": stats["source"],
                                   "prompts": stats["count"], "seed": stats["seed"],
                                   "sha256": record["calibration"].removeprefix("sha256:")}
    guard()
    commit.commit(config, manifest, replace_marker=replace_marker)
    for name in replaced:  # no manifest lists them now
        guard()
        storage.delete(storage.join(data_uri, name), config.storage)
    _write_run_report(config)
    return report


def _write_run_report(config: JobConfig) -> None:
    """The committed run's report and plots (`pipeline.run_report`); the run stands without them."""
    from pipeline.run_report import write_run_report

    try:
        write_run_report(config.output.uri, config.storage)
    except Exception as err:  # the data is committed; a report can be redrawn with `logo-batch report`
        log.warning("the run is committed but its report was not written (%s); "
                    "rerun `logo-batch report %s`", err, config.output.uri)
