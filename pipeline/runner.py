"""`run_job(config) -> RunReport`: the typed entry point of a batch job, start to commit.

    check input (files, columns, ids) and sources  -> nothing runs if any is wrong
    open the output (committed? another job? resume?) -> `commit.open_run`
    scan the data files already written              -> their rows are not computed again
    run the dataflow on the remaining rows            -> `dataflow.run_dataflow`
    scan again, verify exactly-once, manifest, _SUCCESS
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path

from pipeline import commit, inputs, outputs, storage
from pipeline.config import ConfigError, JobConfig
from pipeline.report import RunReport, build_manifest, build_report, report_from_manifest

log = logging.getLogger(__name__)


def new_attempt_id() -> str:
    """Sortable by time, unique: `20261128T163000Z-1a2b3c`."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def check_sources(config: JobConfig) -> None:
    """The model, adapter pool and calibration file exist (cheap checks, before any actor)."""
    named = [("model.path", config.model.path), ("adapters.path", config.adapters.path)]
    if config.routing.calibration not in (None, "input", "reference"):
        named.append(("routing.calibration", config.routing.calibration))
    for key, uri in named:
        if not storage.exists(uri, config.storage):
            raise ConfigError(f"{key}: nothing at {uri!r}; check the path (and storage.endpoint for s3://)")
    out, inp = (_normal(u) for u in (config.output.uri, config.input.uri))
    if out == inp or out.startswith(inp + "/") or inp.startswith(out + "/"):
        raise ConfigError(f"output.uri {config.output.uri!r} overlaps input.uri {config.input.uri!r}: the run's data "
                          "files would be read as input; choose an output outside the input")


def _normal(uri: str) -> str:
    return uri.rstrip("/") if storage.is_s3(uri) else str(Path(uri).expanduser().absolute()).rstrip("/")


def run_statistics(config: JobConfig) -> dict | None:
    """The run's calibration statistics, fixed for its whole life: computed once (in one Ray task)
    and stored as `_calibration.json` beside the data, so a resumed run routes with the same numbers."""
    if config.routing.calibration is None:
        return None
    uri = storage.join(config.output.uri, outputs.CALIBRATION)
    stored = outputs.read_json(uri, config.storage)
    if stored is not None:
        return stored
    from pipeline.dataflow import compute_statistics  # imports Ray

    stats = compute_statistics(config)
    storage.write_if_absent(uri, json.dumps(stats, indent=1).encode(), config.storage)
    return outputs.read_json(uri, config.storage)


def _print_progress(progress) -> None:
    print(f"  written: {progress.files} files, {progress.rows} rows, {progress.errors} errors",
          file=sys.stderr, flush=True)


def run_job(config: JobConfig, *, fail_after_files: int | None = None, progress: bool = True) -> RunReport:
    """Run (or resume, or confirm) the job; return its report once the output is committed.

    `fail_after_files` is a testing hook: the run stops with `InjectedFault` once that many data
    files were written, leaving a partial output for a rerun to resume.
    """
    started = time.time()
    attempt = new_attempt_id()
    files = inputs.discover(config.input, config.storage)
    ids = inputs.row_ids(files, config.input, config.storage)
    check_sources(config)
    if config.output.overwrite:
        removed = commit.clear(config)
        log.info("overwrite: removed %d data files at %s", removed, config.output.uri)
    state = commit.open_run(config, files)
    if state.committed is not None:
        report = report_from_manifest(state.committed, started, attempt)
        print(f"logo-batch: {config.output.uri} is already committed; nothing to do", file=sys.stderr)
        return report
    data_uri = storage.join(config.output.uri, outputs.DATA_DIR)
    done = {value for part in outputs.scan(data_uri, config.storage) for value in part.ids}
    total = inputs.total_rows(files)
    res = config.resources
    rows_per_block = res.rows_per_block or inputs.default_rows_per_block(total - len(done), res.actors,
                                                                         res.batch_size)
    slices = inputs.plan_slices(files, ids, done, rows_per_block)
    phases = {"plan_seconds": round(time.time() - started, 3)}
    computed = 0
    stats = run_statistics(config)
    if slices:
        from pipeline.dataflow import run_dataflow  # imports Ray only when there is work

        t0 = time.time()
        print(f"logo-batch: {total - len(done)} of {total} rows to compute in {len(slices)} blocks "
              f"({len(done)} already written)", file=sys.stderr, flush=True)
        computed = run_dataflow(config, slices, attempt, on_file=_print_progress if progress else None,
                                fail_after_files=fail_after_files, calibration=stats).rows
        phases["dataflow_seconds"] = round(time.time() - t0, 3)
    parts = outputs.scan(data_uri, config.storage)
    commit.verify(parts, ids)
    report = build_report(config, parts, attempt, started, computed)
    manifest = build_manifest(config, files, parts, report, started)
    manifest["timings"].update(phases)
    if stats is not None:
        manifest["calibration"] = {"file": outputs.CALIBRATION, "setting": config.routing.calibration,
                                   "score": config.routing.calibration_score, "source": stats["source"],
                                   "prompts": stats["count"], "seed": stats["seed"]}
    commit.commit(config, manifest)
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
