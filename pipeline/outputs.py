"""The output layout, its schema, writing one data file, and reading back what a run has written.

    <output.uri>/_job.json          what this run is (config hash, input files); written first
    <output.uri>/data/part-<attempt>-<uid>.parquet   one file per block, any number of attempts
    <output.uri>/_manifest.json     written when every input id is in exactly one data file
    <output.uri>/_SUCCESS           written last: the run is complete

Every data file carries its rows' ids, so what a run has finished is read from the data itself:
`scan` reads the id column of each file, deletes a file that does not read (a partial write)
and a file that repeats ids already seen in an earlier file (a straggler of an interrupted
attempt), and returns the rest. Locally a file is written under a temporary name and renamed;
an S3 object appears only when its upload completes.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig

log = logging.getLogger(__name__)

DATA_DIR = "data"
JOB_RECORD = "_job.json"
MANIFEST = "_manifest.json"
CALIBRATION = "_calibration.json"
FORMAT = "logo-batch-run/1"
"""Version of the run layout, recorded in `_job.json` and `_manifest.json`."""
SUCCESS = "_SUCCESS"

OUTPUT_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("output", pa.string()),
    pa.field("adapters", pa.list_(pa.string())),
    pa.field("weights", pa.list_(pa.float32())),
    pa.field("error", pa.string()),
    pa.field("warning", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
]
"""The fixed output columns, in order; pass-through columns follow with their input types."""

_SUMMARY_COLUMNS = ["id", "error", "warning", "adapters", "output_tokens"]


def error_reason(message: str) -> str:
    """An error message with its numbers blanked, to count errors by kind."""
    return re.sub(r"\d+", "N", message)[:200]


@dataclass
class PartFile:
    """One data file of a run, as read back from storage."""

    name: str
    """File name under `data/`."""
    attempt: str
    """The attempt that wrote it (from the file name)."""
    ids: list[str]
    """Ids of its rows."""
    errors: int = 0
    """Rows with an error."""
    warnings: int = 0
    """Rows with a warning."""
    output_tokens: int = 0
    """Generated tokens, all rows."""
    adapter_use: Counter = field(default_factory=Counter)
    """Adapter name -> rows that selected it."""
    error_reasons: Counter = field(default_factory=Counter)
    """Error kind (numbers blanked) -> rows."""

    @property
    def rows(self) -> int:
        return len(self.ids)


def part_name(attempt: str) -> str:
    return f"part-{attempt}-{uuid.uuid4().hex[:12]}.parquet"


def attempt_of(name: str) -> str:
    """`part-<attempt>-<uid>.parquet` -> `<attempt>`."""
    return name[len("part-"):-len(".parquet")].rsplit("-", 1)[0]


def summarize(name: str, table: pa.Table) -> PartFile:
    """Counts for one data file's rows (ids, errors, warnings, tokens, adapter use)."""
    part = PartFile(name, attempt_of(name), table.column("id").to_pylist())
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    part.errors = len(errors)
    part.error_reasons.update(error_reason(e) for e in errors)
    part.warnings = table.num_rows - table.column("warning").null_count
    part.output_tokens = int(sum(v or 0 for v in table.column("output_tokens").to_pylist()))
    for names in table.column("adapters").to_pylist():
        part.adapter_use.update(names or [])
    return part


def write_part(table: pa.Table, *, data_uri: str, config: StorageConfig, attempt: str) -> pa.Table:
    """Write one block of results as a new data file; return a one-row summary (for progress)."""
    name = part_name(attempt)
    fs, root = storage.filesystem(data_uri, config)
    final = f"{root}/{name}"
    if storage.is_s3(data_uri):
        pq.write_table(table, final, filesystem=fs)
    else:
        fs.create_dir(root, recursive=True)
        tmp = f"{root}/.tmp-{name}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)
    errors = table.num_rows - table.column("error").null_count
    return pa.table({"file": [name], "rows": [table.num_rows], "errors": [errors]})


def scan(data_uri: str, config: StorageConfig) -> list[PartFile]:
    """The complete, non-overlapping data files of a run (deleting partial and duplicate ones)."""
    fs, root = storage.filesystem(data_uri, config)
    names = []
    for obj in storage.list_objects(data_uri, config):
        if "/" in obj.key:
            continue
        if obj.key.startswith(".tmp-"):
            storage.delete(storage.join(data_uri, obj.key), config)
        elif obj.key.startswith("part-") and obj.key.endswith(".parquet"):
            names.append(obj.key)

    def read(name: str) -> PartFile | None:
        try:
            return summarize(name, pq.read_table(f"{root}/{name}", filesystem=fs, columns=_SUMMARY_COLUMNS))
        except Exception as err:  # an unreadable file is a partial write: its rows are redone
            log.warning("removing unreadable data file %s (%s); its rows will be recomputed", name, err)
            storage.delete(storage.join(data_uri, name), config)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        parts = [p for p in pool.map(read, sorted(names)) if p is not None]
    seen: set[str] = set()
    kept = []
    for part in parts:
        if seen.intersection(part.ids) or len(set(part.ids)) != part.rows:
            log.warning("removing data file %s: it repeats rows of another file", part.name)
            storage.delete(storage.join(data_uri, part.name), config)
            continue
        seen.update(part.ids)
        kept.append(part)
    return kept


def read_json(uri: str, config: StorageConfig) -> dict | None:
    data = storage.read_bytes(uri, config)
    return None if data is None else json.loads(data)


def read_output(output_uri: str, config: StorageConfig | None = None) -> pa.Table:
    """All rows of a committed run (the files its manifest lists); raises if it is not committed."""
    config = config or StorageConfig()
    if storage.read_bytes(storage.join(output_uri, SUCCESS), config) is None:
        raise FileNotFoundError(f"{output_uri}: no {SUCCESS} marker; the run is not complete (rerun the job)")
    manifest = read_json(storage.join(output_uri, MANIFEST), config)
    fs, root = storage.filesystem(output_uri, config)
    tables = [pq.read_table(f"{root}/{f['path']}", filesystem=fs) for f in manifest["output"]["files"]]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.schema(OUTPUT_FIELDS).empty_table()
