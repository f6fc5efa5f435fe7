"""The output layout, its schema, writing one data file, and reading back what a run has written.

    <output.uri>/_job.json          what this run is (config hash, input files); written first
    <output.uri>/data/part-<attempt>-<uid>.parquet   one file per block, any number of attempts
    <output.uri>/_manifest.json     written when every input row is in exactly one data file
    <output.uri>/_SUCCESS           written last: the run is complete

Every data file records in its Parquet footer (key `logo_batch.part`) which input rows it holds,
as row ranges per input file, with its counts (rows, errors, warnings, output tokens, adapter
use, error kinds, rows decoded to produce it). What a run has finished is read from these
footers alone: `scan` reads each file's footer, deletes a file that is provably a partial write
(locally: a temporary name, or no Parquet magic at its end) and a file whose ranges overlap a file
kept before it (a straggler of an interrupted attempt), and returns the rest. Locally a file is
written under a temporary name and renamed; an S3 object appears only when its upload completes,
so on S3 nothing is deleted for failing to read: a read error (a timeout, a throttle, a foreign
object) is retried, then stops the run naming the file, which is kept.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import OUTPUT_COLUMNS, StorageConfig
from pipeline.errors import OutputError
from pipeline.inputs import INTERNAL_COLUMNS

log = logging.getLogger(__name__)

DATA_DIR = "data"
JOB_RECORD = "_job.json"
MANIFEST = "_manifest.json"
CALIBRATION = "_calibration.json"
FORMAT = "logo-batch-run/3"
"""Version of the run layout, recorded in `_job.json` and `_manifest.json`."""
SUCCESS = "_SUCCESS"

_TYPES = {"id": pa.string(), "output": pa.string(), "adapters": pa.list_(pa.string()),
          "weights": pa.list_(pa.float32()), "confidence": pa.float64(), "error": pa.string(), "warning": pa.string(),
          "prompt_tokens": pa.int64(), "output_tokens": pa.int64()}
assert set(_TYPES) == set(OUTPUT_COLUMNS), "every output column needs its Arrow type here"
OUTPUT_FIELDS = [pa.field(name, _TYPES[name]) for name in OUTPUT_COLUMNS]
"""The fixed output columns (`config.OUTPUT_COLUMNS`, in order) with their Arrow types; pass-through
columns follow with their input types."""

def error_reason(message: str) -> str:
    """An error message with its numbers blanked, to count errors by kind."""
    return re.sub(r"\d+", "N", message)[:200]


def warning_reasons(message: str) -> list[str]:
    """A row's warning (notes joined by `; `) -> the kind of each note, numbers blanked."""
    return [error_reason(note) for note in message.split("; ") if note]


def count_warnings(column: pa.ChunkedArray) -> Counter:
    """Warning kind -> rows, over a `warning` column."""
    out: Counter = Counter()
    for message in column.drop_null().to_pylist():
        out.update(set(warning_reasons(message)))
    return out


BATCHING_COLUMN = "_logo_batching"
"""Internal column of a result block: the actor's batching counters for the block (JSON, on its
first row), recorded in the data file's footer and dropped from its rows."""

PART_KEY = b"logo_batch.part"
"""Parquet footer key of a data file's record (JSON: ranges and counts)."""


@dataclass
class PartFile:
    """One data file of a run, as read back from its footer."""

    name: str
    """File name under `data/`."""
    attempt: str
    """The attempt that wrote it (from the file name)."""
    ranges: list[tuple[str, int, int]]
    """Input rows it holds: (input file name, start, stop) row ranges, sorted."""
    rows: int = 0
    """Rows in the file."""
    errors: int = 0
    """Rows with an error."""
    warnings: int = 0
    """Rows with a warning."""
    output_tokens: int = 0
    """Generated tokens, all rows."""
    decoded: int = 0
    """Input rows decoded by the read tasks whose blocks this file holds."""
    adapter_use: Counter = field(default_factory=Counter)
    """Adapter name -> rows that selected it."""
    batching: Counter = field(default_factory=Counter)
    """How the actor batched these rows: generation batches, generate calls, groups and union-size
    sums, adapter loads, hits and evictions, peak resident adapters, seconds (`LoGoPredictor.batching`)."""
    error_reasons: Counter = field(default_factory=Counter)
    """Error kind (numbers blanked) -> rows."""
    error_ranges: list[tuple[str, int, int]] | None = field(default_factory=list)
    """Input rows of the error rows, as row ranges like `ranges` (None in files of older versions)."""
    warning_reasons: Counter = field(default_factory=Counter)
    """Warning kind (numbers blanked) -> rows (empty in files of older versions)."""
    base_only: int = 0
    """Rows generated by the base model alone (no adapter: confidence below routing.min_confidence)."""

    def record(self) -> dict:
        return {"ranges": [list(r) for r in self.ranges], "rows": self.rows, "errors": self.errors,
                "warnings": self.warnings, "output_tokens": self.output_tokens, "decoded": self.decoded,
                "adapter_use": dict(self.adapter_use), "error_reasons": dict(self.error_reasons),
                "error_ranges": [list(r) for r in self.error_ranges or []], "batching": dict(self.batching),
                "warning_reasons": dict(self.warning_reasons), "base_only": self.base_only}

    @classmethod
    def from_record(cls, name: str, record: dict) -> PartFile:
        return cls(name, attempt_of(name), [(str(f), int(a), int(b)) for f, a, b in record["ranges"]],
                   rows=int(record["rows"]), errors=int(record["errors"]), warnings=int(record["warnings"]),
                   output_tokens=int(record["output_tokens"]), decoded=int(record["decoded"]),
                   adapter_use=Counter(record["adapter_use"]), error_reasons=Counter(record["error_reasons"]),
                   error_ranges=None if "error_ranges" not in record else
                   [(str(f), int(a), int(b)) for f, a, b in record["error_ranges"]],
                   batching=Counter(record.get("batching", {})),
                   warning_reasons=Counter(record.get("warning_reasons", {})), base_only=int(record.get("base_only", 0)))


def part_name(attempt: str) -> str:
    return f"part-{attempt}-{uuid.uuid4().hex[:12]}.parquet"


def attempt_of(name: str) -> str:
    """`part-<attempt>-<uid>.parquet` -> `<attempt>`."""
    return name[len("part-"):-len(".parquet")].rsplit("-", 1)[0]


def row_ranges(files: np.ndarray, rows: np.ndarray, names: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Maximal runs of consecutive rows per input file: (name, start, stop), sorted."""
    if len(rows) == 0:
        return []
    order = np.lexsort((rows, files))
    f, r = files[order], rows[order]
    breaks = np.flatnonzero((np.diff(f) != 0) | (np.diff(r) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(r)]))
    return [(names[int(f[a])], int(r[a]), int(r[b - 1]) + 1) for a, b in zip(starts, stops)]


def summarize(name: str, table: pa.Table, names: tuple[str, ...]) -> PartFile:
    """The record of one block of results: its row ranges and counts."""
    part = PartFile(name, attempt_of(name), row_ranges(table.column("_logo_file").to_numpy(),
                                                       table.column("_logo_row").to_numpy(), names))
    part.rows = table.num_rows
    failed = pc.is_valid(table.column("error")).to_numpy(zero_copy_only=False)
    part.error_ranges = row_ranges(table.column("_logo_file").to_numpy()[failed],
                                   table.column("_logo_row").to_numpy()[failed], names)
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    part.errors = len(errors)
    part.error_reasons.update(error_reason(e) for e in errors)
    part.warnings = table.num_rows - table.column("warning").null_count
    part.warning_reasons = count_warnings(table.column("warning"))
    part.base_only = base_only_rows(table)
    part.output_tokens = int(pc.sum(table.column("output_tokens")).as_py() or 0)
    part.decoded = int(pc.sum(table.column("_logo_decoded")).as_py() or 0)
    if BATCHING_COLUMN in table.column_names:
        for value in table.column(BATCHING_COLUMN).drop_null().to_pylist():
            part.batching.update(json.loads(value))
    flat = pc.list_flatten(table.column("adapters"))
    for item in pc.value_counts(flat).to_pylist() if len(flat) else []:
        part.adapter_use[item["values"]] += item["counts"]
    return part


def base_only_rows(table: pa.Table) -> int:
    """Rows without an error that selected no adapter: generated by the base model alone."""
    empty = pc.equal(pc.list_value_length(table.column("adapters")), 0)
    return int(pc.sum(pc.and_(empty, pc.is_null(table.column("error")))).as_py() or 0)


def write_part(table: pa.Table, *, data_uri: str, config: StorageConfig, attempt: str,
               names: tuple[str, ...], lease: tuple[str, str] | None = None) -> pa.Table:
    """Write one block of results as a new data file with its record in the footer; return a
    one-row summary (for progress). `lease`: (lease URI, owner): the file is written only while
    the lease names that owner (a driver that lost its lease writes nothing more)."""
    part = summarize(part_name(attempt), table, names)
    internal = (*INTERNAL_COLUMNS, BATCHING_COLUMN)
    if lease is not None:
        from pipeline.lease import check_owner

        check_owner(*lease, config)
    _write(table.drop_columns([c for c in internal if c in table.column_names]), part, data_uri, config)
    return pa.table({"file": [part.name], "rows": [part.rows], "errors": [part.errors], "decoded": [part.decoded]})


def _write(table: pa.Table, part: PartFile, data_uri: str, config: StorageConfig) -> None:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           PART_KEY: json.dumps(part.record()).encode()})
    fs, root = storage.filesystem(data_uri, config)
    final = f"{root}/{part.name}"
    if storage.is_s3(data_uri):
        pq.write_table(table, final, filesystem=fs)
    else:
        fs.create_dir(root, recursive=True)
        tmp = f"{root}/.tmp-{part.name}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)


def subtract(ranges: list[tuple[str, int, int]], minus: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Row ranges less other row ranges (both sorted, `minus` within `ranges`)."""
    out = []
    for name, start, stop in ranges:
        position = start
        for m_name, m_start, m_stop in minus:
            if m_name == name and m_start < stop and m_stop > start:
                if m_start > position:
                    out.append((name, position, m_start))
                position = max(position, m_stop)
        if position < stop:
            out.append((name, position, stop))
    return out


def copy_without_errors(data_uri: str, parts: list[PartFile], config: StorageConfig,
                        guard: Callable[[], None] = lambda: None) -> tuple[list[PartFile], list[str]]:
    """For `--retry-errors`: each data file with error rows gets a new file of its other rows, under
    the same attempt; nothing is deleted, so the run the old files make up stays whole until a new
    manifest replaces it (a scan that sees both keeps one of them: a committed manifest's file first,
    else by name, and the plan computes whatever rows that leaves out). Returns (the new files, the
    names of the files they replace)."""
    fs, root = storage.filesystem(data_uri, config)
    written, replaced = [], []
    for part in parts:
        if not part.errors:
            continue
        if part.error_ranges is None:
            raise OutputError(f"data file {part.name} was written by an older version that does not record where "
                              "its error rows are; --retry-errors cannot recompute them; pass --overwrite instead")
        replaced.append(part.name)
        table = pq.read_table(f"{root}/{part.name}", filesystem=fs)
        keep = table.filter(pc.is_null(table.column("error")))
        if not keep.num_rows:
            continue
        new = PartFile(part_name(part.attempt), part.attempt, subtract(part.ranges, part.error_ranges), rows=keep.num_rows,
                       warnings=keep.num_rows - keep.column("warning").null_count,
                       output_tokens=int(pc.sum(keep.column("output_tokens")).as_py() or 0), decoded=part.decoded,
                       batching=Counter(part.batching), warning_reasons=count_warnings(keep.column("warning")),
                       base_only=base_only_rows(keep))
        flat = pc.list_flatten(keep.column("adapters"))
        for item in pc.value_counts(flat).to_pylist() if len(flat) else []:
            new.adapter_use[item["values"]] += item["counts"]
        assert sum(b - a for _, a, b in new.ranges) == new.rows, "error ranges disagree with the error column"
        guard()
        _write(keep, new, data_uri, config)
        written.append(new)
    return written, replaced


def _overlaps(kept: dict[str, list[tuple[int, int]]], ranges: list[tuple[str, int, int]]) -> bool:
    for name, start, stop in ranges:
        taken = kept.get(name, [])
        at = bisect.bisect_left(taken, (start, stop))
        if (at < len(taken) and taken[at][0] < stop) or (at > 0 and taken[at - 1][1] > start):
            return True
    return False


READ_ATTEMPTS = 3
"""Tries to read one data file's footer before a transient storage error stops the run."""


def _is_partial_local(path: str) -> bool:
    """A local file that cannot be a complete Parquet file: shorter than its two magic numbers, or
    without `PAR1` at its end (a write cut short). Anything else that fails to read is not ours to
    delete."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() < 12:
                return True
            f.seek(-4, 2)
            return f.read(4) != b"PAR1"
    except OSError:
        return False


def _read_record(fs, path: str, name: str) -> PartFile:
    with fs.open_input_file(path) as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    if PART_KEY not in metadata:
        raise ValueError(f"no {PART_KEY.decode()} record in its footer")
    return PartFile.from_record(name, json.loads(metadata[PART_KEY]))


def scan(data_uri: str, config: StorageConfig, repair: bool = True, *, guard: Callable[[], None] = lambda: None,
         prefer: Collection[str] = (), ignore: Collection[str] = ()) -> list[PartFile]:
    """The complete, non-overlapping data files of a run, from their footers only. Provably partial
    files (local only) and files overlapping one kept before them are deleted (left alone, but not
    returned, with `repair=False`); a file that fails to read otherwise raises `OutputError` naming
    it, and is kept. Files are kept in name order (an earlier attempt's first), the names in `prefer`
    (a committed manifest's files) before all others; `ignore`d names are neither read, returned
    nor deleted. `guard` is called before every delete (the lease check: it raises to stop)."""
    fs, root = storage.filesystem(data_uri, config)
    remote = storage.is_s3(data_uri)
    ignore = set(ignore)

    def remove(name: str) -> None:
        guard()
        storage.delete(storage.join(data_uri, name), config)

    names = []
    for obj in storage.list_objects(data_uri, config):
        if "/" in obj.key or obj.key in ignore:
            continue
        if obj.key.startswith(".tmp-"):
            if repair and not remote:
                remove(obj.key)
        elif obj.key.startswith("part-") and obj.key.endswith(".parquet"):
            names.append(obj.key)

    def read(name: str) -> PartFile | None:
        path = f"{root}/{name}"
        for attempt in range(READ_ATTEMPTS):
            try:
                return _read_record(fs, path, name)
            except FileNotFoundError:
                return None  # gone since the listing: nothing of it to count
            except Exception as err:
                if not remote and _is_partial_local(path):
                    if repair:
                        log.warning("removing partial data file %s (%s); its rows will be recomputed", name, err)
                        remove(name)
                    return None
                if remote and isinstance(err, OSError) and attempt + 1 < READ_ATTEMPTS:
                    time.sleep(0.5 * 2 ** attempt)  # a timeout or throttle: try again
                    continue
                reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
                raise OutputError(
                    f"cannot read data file {storage.join(data_uri, name)} ({reason}); it was "
                    "not deleted. If storage was unavailable, rerun the job; if the file is not this run's, move "
                    "it out of the output; --overwrite starts the run again") from None
        raise AssertionError("unreachable")

    preferred = set(prefer)
    names.sort(key=lambda name: (name not in preferred, name))
    with ThreadPoolExecutor(max_workers=16) as pool:
        parts = [p for p in pool.map(read, names) if p is not None]
    kept_ranges: dict[str, list[tuple[int, int]]] = {}
    kept = []
    for part in parts:
        if _overlaps(kept_ranges, part.ranges):
            if repair:
                log.warning("removing data file %s: it repeats rows of another file", part.name)
                remove(part.name)
            continue
        for name, start, stop in part.ranges:
            bisect.insort(kept_ranges.setdefault(name, []), (start, stop))
        kept.append(part)
    return sorted(kept, key=lambda p: p.name)


def done_ranges(parts: list[PartFile]) -> dict[str, list[tuple[int, int]]]:
    """Input file name -> the row ranges the parts hold."""
    done: dict[str, list[tuple[int, int]]] = {}
    for part in parts:
        for name, start, stop in part.ranges:
            done.setdefault(name, []).append((start, stop))
    return done


def read_json(uri: str, config: StorageConfig) -> dict | None:
    """A small JSON record of the run (None if absent); one that does not parse raises `OutputError`
    naming it."""
    data = storage.read_bytes(uri, config)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as err:
        raise OutputError(f"{uri} is not valid JSON ({err}): it was cut short or edited; restore it, or pass "
                          "--overwrite to start the run again") from None
    if not isinstance(value, dict):
        raise OutputError(f"{uri} does not hold a JSON object; restore it, or pass --overwrite to start again")
    return value


def read_output(output_uri: str, config: StorageConfig | None = None) -> pa.Table:
    """All rows of a committed run (the files its manifest lists); raises if it is not committed."""
    config = config or StorageConfig()
    if storage.read_bytes(storage.join(output_uri, SUCCESS), config) is None:
        raise FileNotFoundError(f"{output_uri}: no {SUCCESS} marker; the run is not complete (rerun the job)")
    manifest = read_json(storage.join(output_uri, MANIFEST), config)
    fs, root = storage.filesystem(output_uri, config)
    tables = [pq.read_table(f"{root}/{f['path']}", filesystem=fs) for f in manifest["output"]["files"]]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.schema(OUTPUT_FIELDS).empty_table()
