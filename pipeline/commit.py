"""The commit protocol: claim an output, check exactly-once coverage, write manifest then `_SUCCESS`.

1. `committed_manifest` first, before the input is read: `_SUCCESS` and `_job.json` of the same
   configuration and an input listing equal to the one pinned mean "nothing to do"; another
   configuration, or input files added, removed or changed since, are refused naming them.
2. `open_run` before any work: an output of another job (different configuration hash, layout
   version or input files) is refused, and so is one whose input, model or adapter files were
   replaced since it started (`pins`: sizes, modification times, ETags and digests). An
   uncommitted output is claimed by storing its calibration statistics (`_calibration.json`, checked
   against the pool first) and then writing `_job.json` only if absent (S3: a conditional put), with
   the statistics' sha256 among its pins; if present, it is checked to be the same job, which makes
   this run a resume of it, and `_calibration.json` must still have its pinned digest.
3. The data files' footers are scanned (`outputs.scan`), the row ranges no file holds are
   computed, and the footers scanned again; `verify` then checks, per input file, that the
   files' row ranges cover every row exactly once and nothing else.
4. `commit` writes `_manifest.json`, then `_SUCCESS` last. A reader trusts a run only with the
   marker, and reads the files the manifest lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection

from pipeline import pins, storage
from pipeline.config import JobConfig
from pipeline.config_io import changed_keys, config_hash, hashed_values
from pipeline.errors import OutputError
from pipeline.inputs import InputFile
from pipeline.outputs import CALIBRATION, DATA_DIR, FORMAT, JOB_RECORD, MANIFEST, SUCCESS, PartFile, read_json



READABLE = ("logo-batch-run/2", FORMAT)
"""Layouts whose committed runs this version reads as they are (a partial one must be this layout)."""


def _uri(config: JobConfig, name: str) -> str:
    return storage.join(config.output.uri, name)


def job_record(config: JobConfig, files: list[InputFile]) -> dict:
    return {
        "format": FORMAT,
        "config_hash": config_hash(config),
        "config": hashed_values(config),
        "input_files": [{"uri": storage.normal_uri(f.uri), "rows": f.rows} for f in files],
        "contents": pins.pins(config, files),
    }


def _same_job(record: dict, theirs: dict, where: str) -> None:
    if theirs.get("format", record["format"]) != record["format"]:
        raise OutputError(f"{where} has the run layout {theirs.get('format')!r}, not {record['format']!r}; pass "
                          "--overwrite to start again with this version, or choose another output.uri")
    if theirs.get("config_hash") != record["config_hash"] and isinstance(theirs.get("config"), dict):
        keys = "; ".join(changed_keys(theirs["config"], record["config"])) or "the same values, hashed otherwise"
        raise OutputError(f"{where} belongs to a different job ({keys}; its value -> this job's): set them back to "
                          "resume it, pass --overwrite to replace it, or choose another output.uri")
    if theirs.get("config_hash") != record["config_hash"]:
        raise OutputError(
            f"{where} belongs to a different job (configuration hash {str(theirs.get('config_hash'))[:12]}, this "
            f"job {record['config_hash'][:12]}); rerun with the original configuration to resume it, pass "
            "--overwrite to replace it, or choose another output.uri")
    changed = (pins.changes(theirs["contents"], record["contents"])
               if "contents" in theirs and "contents" in record else [])
    if changed:
        raise OutputError(
            f"{where} was computed from other contents than are there now: {'; '.join(changed)}. Resuming would "
            "mix results of old and new files: restore the original files, or pass --overwrite to start again")
    if theirs.get("input_files") != record["input_files"]:
        raise OutputError(
            f"{where} was made from different input files or row counts than the input now has; pass "
            "--overwrite to start again, or choose another output.uri")


def committed_manifest(config: JobConfig) -> dict | None:
    """The manifest of a committed run of this configuration at the output, else None. Reads
    `_SUCCESS`, `_job.json` and the manifest, and lists the input (no input file is opened): a
    committed run whose input changed since is refused (`OutputError` naming the files), never
    reported as done."""
    cfg = config.storage
    marker = storage.read_bytes(_uri(config, SUCCESS), cfg)
    if marker is None:
        return None
    where = f"the committed run at {config.output.uri}"
    theirs = read_json(_uri(config, JOB_RECORD), cfg)
    if theirs is None:
        try:
            theirs = json.loads(marker)
        except ValueError:
            raise OutputError(f"{_uri(config, SUCCESS)} is not valid JSON and there is no {JOB_RECORD}; restore "
                              "them, or pass --overwrite to start the run again") from None
    record = {"format": FORMAT, "config_hash": config_hash(config), "config": hashed_values(config),
              "input_files": None}
    layout = FORMAT if theirs.get("format") in READABLE else theirs.get("format")  # nothing to compute in these
    _same_job(record, {**theirs, "input_files": None, "format": layout}, where)
    changed = pins.input_changes(theirs.get("contents", {}), config) if "contents" in theirs else []
    if changed:
        raise OutputError(
            f"{where} was computed from other input than is there now: {'; '.join(changed)}. The committed rows "
            "are left as they are; to compute the input as it is now, rerun with --overwrite (every row is "
            "computed again) or choose another output.uri")
    manifest = read_json(_uri(config, MANIFEST), cfg)
    if manifest is None:
        raise OutputError(f"{where} has {SUCCESS} but no {MANIFEST}; restore it, or pass --overwrite to start again")
    if manifest.get("config_hash", record["config_hash"]) != record["config_hash"]:
        raise OutputError(f"{where} is being replaced by this job (an interrupted `nightly --force`): its committed "
                          "rows are another configuration's; rerun with --force to finish the replacement")
    return manifest


def committed_hash(config: JobConfig) -> str | None:
    """The configuration hash of the committed run's manifest at the output (None if uncommitted)."""
    if storage.read_bytes(_uri(config, SUCCESS), config.storage) is None:
        return None
    return (read_json(_uri(config, MANIFEST), config.storage) or {}).get("config_hash")


def committed_files(config: JobConfig, any_job: bool = False) -> set[str]:
    """Names (under `data/`) of the data files a committed run's manifest lists; empty if uncommitted.
    Only those of this job's run, unless `any_job` (a committed run being replaced)."""
    if storage.read_bytes(_uri(config, SUCCESS), config.storage) is None:
        return set()
    if not any_job and committed_hash(config) not in (None, config_hash(config)):
        return set()  # a replacement in progress: the committed files are another job's
    manifest = read_json(_uri(config, MANIFEST), config.storage) or {}
    return {f["path"].rsplit("/", 1)[-1] for f in manifest.get("output", {}).get("files", [])}


def open_run(config: JobConfig, files: list[InputFile], statistics: Callable[[dict], dict | None],
             guard: Callable[[], None] = lambda: None, ignore: Collection[str] = ()) -> tuple[dict, dict | None]:
    """Claim the (uncommitted) output for this job, or check that it is this job's partial run;
    returns its `_job.json` record and its calibration statistics (None without calibration).

    `statistics(contents)` computes the statistics of a new run (checked against the pool, with the
    model and pool pinned to `contents`); `guard` is called before every write or delete; data
    files named in `ignore` (a committed run being replaced) do not stop a claim."""
    cfg = config.storage
    record = job_record(config, files)
    calibration_uri = _uri(config, CALIBRATION)
    theirs = read_json(_uri(config, JOB_RECORD), cfg)
    if theirs is not None:
        _same_job(record, theirs, f"the partial run at {config.output.uri}")
        return theirs, _pinned_statistics(calibration_uri, theirs, cfg)
    if [o for o in storage.list_objects(_uri(config, DATA_DIR), cfg) if o.key not in set(ignore)]:
        raise OutputError(f"{config.output.uri} has files under {DATA_DIR}/ but no {JOB_RECORD}: not a run this "
                          "tool can resume; pass --overwrite to replace them, or choose another output.uri")
    stats = statistics(record["contents"])
    if stats is not None:
        data = json.dumps(stats, indent=1).encode()
        guard()
        storage.write_bytes(calibration_uri, data, cfg)  # over any left by an attempt that never claimed
        record["calibration"] = pins.digest(data)
    guard()
    if not storage.write_if_absent(_uri(config, JOB_RECORD), json.dumps(record, indent=1).encode(), cfg):
        raise OutputError(f"another driver claimed {config.output.uri} at the same moment; rerun to resume its run")
    return record, stats


def _pinned_statistics(uri: str, record: dict, cfg) -> dict | None:
    """The run's `_calibration.json`, checked against the digest its `_job.json` pins."""
    pinned = record.get("calibration")
    if pinned is None:
        return None
    data = storage.read_bytes(uri, cfg)
    if data is None:
        raise OutputError(f"{uri} is missing: the run's calibration statistics were removed since it started; "
                          "restore the file, or pass --overwrite to start the run again")
    if pins.digest(data) != pinned:
        raise OutputError(f"{uri} changed since the run started ({pinned[:19]}... -> {pins.digest(data)[:19]}...): "
                          "resuming would route part of the run with other statistics; restore the file, or pass "
                          "--overwrite to start the run again")
    try:
        return json.loads(data)
    except ValueError as err:
        raise OutputError(f"{uri} is not valid JSON ({err}); restore it, or pass --overwrite") from None


def clear(config: JobConfig) -> int:
    """Delete a run's files at the output (marker first, so no reader sees a half-deleted run)."""
    cfg = config.storage
    for name in (SUCCESS, MANIFEST):
        storage.delete(_uri(config, name), cfg)
    removed = storage.delete_prefix(_uri(config, DATA_DIR), cfg)
    storage.delete(_uri(config, CALIBRATION), cfg)
    storage.delete(_uri(config, JOB_RECORD), cfg)
    return removed


def verify(parts: list[PartFile], files: list[InputFile]) -> None:
    """Per input file, the parts' row ranges cover every row exactly once and nothing else; raises
    OutputError otherwise. Works on ranges (a few per data file), never on row ids."""
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for part in parts:
        for name, start, stop in part.ranges:
            by_file.setdefault(name, []).append((start, stop, part.name))
    known = {f.name for f in files}
    extra = sorted(set(by_file) - known)
    if extra:
        raise OutputError(f"data files hold rows of {extra[0]!r}, which is not in the input; the input changed "
                          "under the run: pass --overwrite to start again")
    missing, example = 0, None
    for f in files:
        position = 0
        for start, stop, name in sorted(by_file.get(f.name, [])):
            if start < position:
                raise OutputError(f"row {start} of {f.uri} is in two data files (one is {name}); "
                                  "rerun the job to repair the output")
            if start > position:
                missing += start - position
                example = example or f"row {position} of {f.uri}"
            position = stop
        if position > f.rows:
            raise OutputError(f"data files hold rows up to {position - 1} of {f.uri}, which has {f.rows}; the input "
                              "changed under the run: pass --overwrite to start again")
        if position < f.rows:
            missing += f.rows - position
            example = example or f"row {position} of {f.uri}"
    if missing:
        raise OutputError(f"{missing} input rows have no output (e.g. {example}); rerun the job to compute them")


def commit(config: JobConfig, manifest: dict, replace_marker: bool = False) -> None:
    """Write the manifest, then the `_SUCCESS` marker (last). Replacing the manifest of a committed
    run (`--retry-errors`, `nightly --force`) is one atomic write: a reader sees the old run or the
    new one; `replace_marker` rewrites a marker that is there (another configuration's)."""
    cfg = config.storage
    storage.write_bytes(_uri(config, MANIFEST), json.dumps(manifest, indent=1).encode(), cfg)
    marker = {"manifest": MANIFEST, "config_hash": manifest["config_hash"], "rows": manifest["output"]["rows"]}
    if replace_marker:
        storage.write_bytes(_uri(config, SUCCESS), json.dumps(marker).encode(), cfg)
    else:
        storage.write_if_absent(_uri(config, SUCCESS), json.dumps(marker).encode(), cfg)
