"""The commit protocol: claim an output, check exactly-once coverage, write manifest then `_SUCCESS`.

1. `open_run` before any work: a committed output of the same job means "nothing to do"; one of
   another job (different configuration hash or input files) is refused. An uncommitted output
   is claimed by writing `_job.json` only if absent (S3: a conditional put), or, if present,
   checked to be the same job, which makes this run a resume of it.
2. The data files are scanned (`outputs.scan`), the missing rows computed, and the files
   scanned again; `verify` then checks that their ids are exactly the input ids, each once.
3. `commit` writes `_manifest.json`, then `_SUCCESS` last. A reader trusts a run only with the
   marker, and reads the files the manifest lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import JobConfig
from pipeline.config_io import config_hash
from pipeline.inputs import InputFile
from pipeline.outputs import CALIBRATION, DATA_DIR, FORMAT, JOB_RECORD, MANIFEST, SUCCESS, PartFile, read_json



class OutputError(RuntimeError):
    """The output location holds something this run must not touch or cannot complete."""


def _uri(config: JobConfig, name: str) -> str:
    return storage.join(config.output.uri, name)


def job_record(config: JobConfig, files: list[InputFile]) -> dict:
    return {
        "format": FORMAT,
        "config_hash": config_hash(config),
        "input_files": [{"uri": f.uri, "rows": f.rows} for f in files],
    }


def _same_job(record: dict, theirs: dict, where: str) -> None:
    if theirs.get("config_hash") != record["config_hash"]:
        raise OutputError(
            f"{where} belongs to a different job (configuration hash {str(theirs.get('config_hash'))[:12]}, this "
            f"job {record['config_hash'][:12]}); rerun with the original configuration to resume it, pass "
            "--overwrite to replace it, or choose another output.uri")
    if theirs.get("input_files") != record["input_files"]:
        raise OutputError(
            f"{where} was made from different input files or row counts than the input now has; pass "
            "--overwrite to start again, or choose another output.uri")


@dataclass(frozen=True)
class RunState:
    committed: dict | None
    """The manifest of a committed run of this same job (None: work to do)."""


def open_run(config: JobConfig, files: list[InputFile]) -> RunState:
    """Check what is at the output and claim it for this job (see the module docstring)."""
    cfg = config.storage
    record = job_record(config, files)
    if storage.read_bytes(_uri(config, SUCCESS), cfg) is not None:
        manifest = read_json(_uri(config, MANIFEST), cfg) or {}
        _same_job(record, {"config_hash": manifest.get("config_hash"),
                           "input_files": manifest.get("input", {}).get("files")},
                  f"the committed run at {config.output.uri}")
        return RunState(committed=manifest)
    data = json.dumps(record, indent=1).encode()
    if not storage.write_if_absent(_uri(config, JOB_RECORD), data, cfg):
        theirs = read_json(_uri(config, JOB_RECORD), cfg) or {}
        _same_job(record, theirs, f"the partial run at {config.output.uri}")
    elif storage.list_objects(_uri(config, DATA_DIR), cfg):
        storage.delete(_uri(config, JOB_RECORD), cfg)
        raise OutputError(f"{config.output.uri} has files under {DATA_DIR}/ but no {JOB_RECORD}: not a run this "
                          "tool can resume; pass --overwrite to replace them, or choose another output.uri")
    return RunState(committed=None)


def clear(config: JobConfig) -> int:
    """Delete a run's files at the output (marker first, so no reader sees a half-deleted run)."""
    cfg = config.storage
    for name in (SUCCESS, MANIFEST):
        storage.delete(_uri(config, name), cfg)
    removed = storage.delete_prefix(_uri(config, DATA_DIR), cfg)
    storage.delete(_uri(config, CALIBRATION), cfg)
    storage.delete(_uri(config, JOB_RECORD), cfg)
    return removed


def verify(parts: list[PartFile], ids: list[list[str]]) -> None:
    """Every input id in exactly one data file, and nothing else; raises OutputError otherwise."""
    expected = {value for file_ids in ids for value in file_ids}
    written: dict[str, str] = {}
    for part in parts:
        for value in part.ids:
            if value in written:
                raise OutputError(f"id {value!r} is in two data files ({written[value]}, {part.name}); "
                                  "rerun the job to repair the output")
            written[value] = part.name
    missing = expected.difference(written)
    if missing:
        raise OutputError(f"{len(missing)} input rows have no output (e.g. id {min(missing)!r}); "
                          "rerun the job to compute them")
    extra = set(written).difference(expected)
    if extra:
        raise OutputError(f"{len(extra)} output rows are not in the input (e.g. id {min(extra)!r}); the input "
                          "changed under the run: pass --overwrite to start again")


def commit(config: JobConfig, manifest: dict) -> None:
    """Write the manifest, then the `_SUCCESS` marker (last)."""
    cfg = config.storage
    storage.write_bytes(_uri(config, MANIFEST), json.dumps(manifest, indent=1).encode(), cfg)
    marker = {"manifest": MANIFEST, "config_hash": manifest["config_hash"], "rows": manifest["output"]["rows"]}
    storage.write_if_absent(_uri(config, SUCCESS), json.dumps(marker).encode(), cfg)
