"""Input discovery and checks, row ids, and the read plan (no Ray here; `dataflow` wraps it).

Everything that can be wrong with the input is found on the driver before any actor starts:
no Parquet files, a missing prompt, id or pass-through column (the message lists the columns
that are there), a null id (from the Parquet statistics, else one file's id column at a time).
Duplicate ids are counted in the cluster (`ids.duplicate_ids`); the driver then reads the
id column only to name the two places of a duplicate.

Row ids are the configured id column converted to strings, or `<file relative to input.uri>:<row>`.
The read plan (`plan_reads`) comes from the Parquet footers alone: read units of whole row groups,
each cut into slices (row ranges) of at most `rows_per_block` rows; one slice is one Ray block,
so there are enough blocks for every actor, and every row group is decoded once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import guards, storage
from pipeline.columns import is_text as _is_string, plain, plain_type, utf8_errors
from pipeline.config import InputConfig, StorageConfig
from pipeline.errors import InputError

INPUT_ERROR = "_logo_input_error"
"""Internal column: why a row cannot be processed before the model sees it (null when fine)."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    """Where the file is (as given, joined with its relative name)."""
    name: str
    """Path relative to `input.uri` (the base name for a single file); used in derived ids."""
    rows: int
    """Number of rows."""
    row_groups: tuple[int, ...]
    """Rows per Parquet row group, in order."""
    prompt_type: str
    """Arrow type of the prompt column in this file (a dictionary or string_view as `string`)."""

    @property
    def prompt_text(self) -> bool:
        """The prompt column holds text (else every row of the file is an error row)."""
        return self.prompt_type in ("string", "large_string")


@dataclass(frozen=True)
class Slice:
    """Picked rows of one file (a sample); `read_slice` reads them."""

    file: InputFile
    """The file the rows come from."""
    positions: tuple[int, ...]
    """Row positions within the file, ascending."""
    ids: tuple[str, ...]
    """The rows' ids, same order."""


def list_files(cfg: InputConfig, config: StorageConfig) -> list[tuple[str, str, str]]:
    """(fs path, name relative to the input, URI) for every Parquet file of the input, sorted."""
    fs, root = storage.filesystem(cfg.uri, config)
    with storage.access(cfg.uri, config):  # the input's first request: refused credentials named in one line
        info = fs.get_file_info(root)
        listed = [] if info.type == pafs.FileType.File else \
            fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    if info.type == pafs.FileType.File:
        return [(root, root.rsplit("/", 1)[-1], cfg.uri)]
    if info.type == pafs.FileType.NotFound and not storage.is_s3(cfg.uri):
        raise InputError(f"input.uri {cfg.uri!r}: no such file or directory")
    found = []
    for item in listed:
        rel = item.path[len(root):].lstrip("/")
        hidden = any(part.startswith(("_", ".")) for part in rel.split("/"))
        if item.type == pafs.FileType.File and rel.endswith(".parquet") and not hidden:
            found.append((item.path, rel, storage.join(cfg.uri, rel)))
    if not found:
        raise InputError(f"input.uri {cfg.uri!r}: no .parquet files there (names starting with '_' or '.' "
                         "are skipped); check the path and the storage endpoint")
    return sorted(found, key=lambda triple: triple[1])


def _open(path: str, cfg: InputConfig, config: StorageConfig) -> pq.ParquetFile:
    fs, _ = storage.filesystem(cfg.uri, config)
    return pq.ParquetFile(fs.open_input_file(path))


def discover(cfg: InputConfig, config: StorageConfig) -> list[InputFile]:
    """Every input file with its row counts, after checking that the configured columns exist."""
    def inspect(triple: tuple[str, str, str]) -> InputFile:
        path, rel, uri = triple
        try:
            meta = _open(path, cfg, config)
        except Exception as err:
            raise InputError(f"{uri}: cannot read it as Parquet ({err}); fix or remove the file") from None
        schema = meta.schema_arrow
        guards.check_input_schema(schema.names, cfg, uri)
        wanted = [("input.prompt_column", cfg.prompt_column)]
        wanted += [("input.id_column", cfg.id_column)] if cfg.id_column else []
        wanted += [("input.passthrough", name) for name in cfg.passthrough]
        for key, column in wanted:
            if column not in schema.names:
                raise InputError(f"{uri}: no column {column!r} ({key}); columns there: {', '.join(schema.names)}")
        groups = tuple(meta.metadata.row_group(i).num_rows for i in range(meta.metadata.num_row_groups))
        kept = {("input.passthrough", name): plain_type(schema.field(name).type) for name in cfg.passthrough}
        if cfg.id_column:
            kept["input.id_column", cfg.id_column] = plain_type(schema.field(cfg.id_column).type)
        prompt_type = str(plain_type(schema.field(cfg.prompt_column).type))
        return InputFile(uri, rel, meta.metadata.num_rows, groups, prompt_type), kept

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(inspect, list_files(cfg, config)))
    guards.check_column_types(found)
    return [f for f, _ in found]


def check_nulls(files: list[InputFile], cfg: InputConfig, config: StorageConfig) -> None:
    """A configured id column has no null: from the Parquet statistics, else by reading the column of
    one file at a time (never all ids at once). Duplicates are found in the cluster (`ids.duplicate_ids`)."""
    if cfg.id_column is None:
        return

    def check(f: InputFile) -> None:
        parquet = _open(storage.filesystem(f.uri, config)[1], cfg, config)
        index = parquet.schema_arrow.get_field_index(cfg.id_column)
        meta = parquet.metadata
        counted = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
        if all(s is not None and s.has_null_count for s in counted) and not any(s.null_count for s in counted):
            return
        column = parquet.read(columns=[cfg.id_column]).column(0)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{f.uri}: row {row} has a null id in column {cfg.id_column!r} (input.id_column); "
                             "every row needs a unique id")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(check, files))


def locate_ids(files: list[InputFile], values: list[str], cfg: InputConfig, config: StorageConfig
               ) -> dict[str, list[tuple[str, int]]]:
    """(file URI, row) of each of a few id values, reading the id column of one file at a time."""
    wanted = pa.array(values, pa.string())
    found: dict[str, list[tuple[str, int]]] = {v: [] for v in values}
    for f in files:
        column = pc.cast(_open(storage.filesystem(f.uri, config)[1], cfg, config)
                         .read(columns=[cfg.id_column]).column(0), pa.string())
        for row in np.flatnonzero(pc.is_in(column, value_set=wanted).to_numpy(zero_copy_only=False)):
            found[column[int(row)].as_py()].append((f.uri, int(row)))
    return found


def duplicate_error(files: list[InputFile], values: list[str], cfg: InputConfig, config: StorageConfig) -> InputError:
    """The error for duplicated ids (found in the cluster), naming the first two places of the first one."""
    places = locate_ids(files, values[:1], cfg, config)[values[0]]
    (first_uri, first_row), (uri, row) = places[0], places[1]
    return InputError(f"duplicate id {values[0]!r} in column {cfg.id_column!r} (input.id_column): "
                      f"{first_uri} row {first_row} and {uri} row {row}; ids must be unique")


def default_rows_per_block(remaining: int, actors: int, batch_size: int) -> int:
    """About four blocks per actor, at least one batch and at most 4096 rows per block."""
    return int(min(4096, max(batch_size, -(-remaining // (4 * actors)))))


@dataclass(frozen=True)
class RowRange:
    """A slice of the plan: rows `start <= row < stop` of one input file; one Ray block."""

    start: int
    """First row position in the file."""
    stop: int
    """One past the last row position."""

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ReadUnit:
    """One read task: decodes consecutive row groups of one file once and yields its slices."""

    file: InputFile
    """The file."""
    index: int
    """The file's position in the input's file list (rows carry it to the output accounting)."""
    groups: tuple[int, ...]
    """Row groups decoded, consecutive."""
    first_row: int
    """Position in the file of the first row of `groups[0]`."""
    slices: tuple[RowRange, ...]
    """The slices yielded, ascending, all inside the decoded row groups."""

    @property
    def decoded_rows(self) -> int:
        return sum(self.file.row_groups[g] for g in self.groups)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.slices)


def todo_ranges(rows: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The complement of the (non-overlapping) `done` ranges within [0, rows)."""
    todo, position = [], 0
    for start, stop in sorted(done):
        if start > position:
            todo.append((position, start))
        position = max(position, stop)
    if position < rows:
        todo.append((position, rows))
    return todo


def plan_reads(files: list[InputFile], done: dict[str, list[tuple[int, int]]], rows_per_block: int) -> list[ReadUnit]:
    """Read tasks covering every row not in `done` (file name -> finished row ranges), from metadata only.

        row groups  |   g0 (10)   | g1 (4) | g2 (4) |  g3 (12)    |
        to do       |xxxxxxxxxxxxx|xxxxxxxx|xxxxxxxx|xxxx   xxxxxx|   (rows_per_block = 6)
        read units  | unit 0      | unit 1          | unit 2      |
        slices      |[6)   [4)    |[6)   [2)        |[4)   [6)    |

    Consecutive row groups are joined until a unit holds `rows_per_block` rows to do; a larger row
    group is one unit whose slices are cut from the one decoded copy. A row group with nothing left
    to do ends a unit and is not read. Every row group is decoded by at most one unit, so every row
    to do is decoded once, and a resumed run decodes at most one extra row group per boundary of
    finished work.
    """
    units = []
    for index, f in enumerate(files):
        todo = todo_ranges(f.rows, done.get(f.name, []))
        starts = np.cumsum((0,) + f.row_groups)
        groups: list[int] = []
        for g in range(len(f.row_groups)):
            lo, hi = int(starts[g]), int(starts[g + 1])
            if not _inside(todo, lo, hi):
                if groups:
                    units.append(_unit(f, index, groups, starts, todo, rows_per_block))
                groups = []
                continue
            groups.append(g)
            if sum(b - a for a, b in _inside(todo, int(starts[groups[0]]), hi)) >= rows_per_block:
                units.append(_unit(f, index, groups, starts, todo, rows_per_block))
                groups = []
        if groups:
            units.append(_unit(f, index, groups, starts, todo, rows_per_block))
    return units


def _inside(todo: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in todo if a < hi and b > lo]


def _unit(f: InputFile, index: int, groups: list[int], starts, todo, rows_per_block: int) -> ReadUnit:
    lo, hi = int(starts[groups[0]]), int(starts[groups[-1] + 1])
    slices = []
    for a, b in _inside(todo, lo, hi):
        slices += [RowRange(s, min(s + rows_per_block, b)) for s in range(a, b, rows_per_block)]
    return ReadUnit(f, index, tuple(groups), lo, tuple(slices))


INTERNAL_COLUMNS = ("_logo_file", "_logo_row", "_logo_decoded")
"""Internal columns a read block carries to the write: the file index and row position of every row
(the written data files record their row ranges from them) and the rows decoded to produce it."""


DECODE_ERROR = "_logo_decode_error"
"""Column of a decoded batch: why its row group could not be decoded (null when it was)."""


def _decode_group(parquet: pq.ParquetFile, unit: ReadUnit, group: int, columns: list[str],
                  cfg: InputConfig) -> list[pa.RecordBatch]:
    """One row group's batches, or, if it does not decode (a corrupt page under a valid footer), one
    batch of its rows with every value null and DECODE_ERROR set: those rows become error rows.
    With an id column the rows' ids are unknown, so the run stops instead, naming the file."""
    try:
        batches = list(parquet.iter_batches(batch_size=65536, row_groups=[group], columns=columns))
        return [b.append_column(DECODE_ERROR, pa.nulls(b.num_rows, pa.string())) for b in batches]
    except Exception as err:
        reason = (f"row group {group} of {unit.file.uri} cannot be decoded "
                  f"({type(err).__name__}: {' '.join(str(err).split())})")
        if cfg.id_column:
            raise InputError(f"{reason}; its rows' ids are unknown: fix or replace the file") from None
        n = unit.file.row_groups[group]
        schema = parquet.schema_arrow
        arrays = [pa.nulls(n, schema.field(c).type) for c in columns]
        arrays.append(pa.array([f"{reason}; fix or replace the file"] * n, pa.string()))
        return [pa.RecordBatch.from_arrays(arrays, names=columns + [DECODE_ERROR])]


def read_unit(unit: ReadUnit, cfg: InputConfig, config: StorageConfig) -> Iterator[pa.Table]:
    """Decode the unit's row groups once, one at a time, and yield one table per slice (see `_finish`)."""
    fs, path = storage.filesystem(unit.file.uri, config)
    parquet = pq.ParquetFile(fs.open_input_file(path))
    columns = _columns(cfg) + ([cfg.id_column] if cfg.id_column and cfg.id_column not in _columns(cfg) else [])
    batches = (b for g in unit.groups for b in _decode_group(parquet, unit, g, columns, cfg))
    pending: list[pa.RecordBatch] = []
    pending_start = position = unit.first_row  # file positions of pending[0]'s first row and the next row
    for piece in unit.slices:
        decoded = 0
        while position < piece.stop:
            batch = next(batches)
            pending.append(batch)
            position += batch.num_rows
            decoded += batch.num_rows
        table = pa.Table.from_batches(pending).slice(piece.start - pending_start, piece.rows)
        yield _finish(table, unit, piece, cfg, decoded)
        while pending and pending_start + pending[0].num_rows <= piece.stop:  # drop what later slices skip
            pending_start += pending.pop(0).num_rows


def _finish(table: pa.Table, unit: ReadUnit, piece: RowRange, cfg: InputConfig, decoded: int) -> pa.Table:
    """`id`, the prompt column, pass-through columns, INPUT_ERROR and the internal columns."""
    n = table.num_rows
    if cfg.id_column:
        ids = pc.cast(table.column(cfg.id_column), pa.string())
    else:
        ids = pa.array([f"{unit.file.name}:{row}" for row in range(piece.start, piece.stop)], pa.string())
    out = _with_prompt(table, ids, unit.file.uri, cfg, piece.start)
    out = out.append_column("_logo_file", pa.array(np.full(n, unit.index, np.int32)))
    out = out.append_column("_logo_row", pa.array(np.arange(piece.start, piece.stop, dtype=np.int64)))
    decoded_column = np.zeros(n, np.int64)
    if n:
        decoded_column[0] = decoded
    return out.append_column("_logo_decoded", pa.array(decoded_column))


def _columns(cfg: InputConfig) -> list[str]:
    return list(dict.fromkeys([cfg.prompt_column, *cfg.passthrough]))


def read_slice(piece: Slice, cfg: InputConfig, config: StorageConfig) -> pa.Table:
    """A few picked rows (samples): `id`, the prompt column, pass-through columns and INPUT_ERROR.
    Only the row groups holding them are decoded."""
    fs, path = storage.filesystem(piece.file.uri, config)
    parquet = pq.ParquetFile(fs.open_input_file(path))
    starts = np.cumsum((0,) + piece.file.row_groups)
    groups = sorted({int(np.searchsorted(starts, p, side="right") - 1) for p in piece.positions})
    table = parquet.read_row_groups(groups, columns=_columns(cfg))
    offsets = np.cumsum([0] + [piece.file.row_groups[g] for g in groups])
    local = [int(offsets[groups.index(g)] + p - starts[g])
             for p, g in ((p, int(np.searchsorted(starts, p, side="right") - 1)) for p in piece.positions)]
    return _with_prompt(table.take(pa.array(local, pa.int64())), pa.array(piece.ids, pa.string()), piece.file.uri, cfg)


def _with_prompt(table: pa.Table, ids: pa.Array, uri: str, cfg: InputConfig, first_row: int = 0) -> pa.Table:
    n = table.num_rows
    prompt = table.column(cfg.prompt_column)
    errors = [None] * n
    if not _is_string(prompt.type):
        message = (f"prompt is {prompt.type} in {uri}, not string; store column "
                   f"{cfg.prompt_column!r} as strings")
        errors = [message] * n
        prompt = pa.nulls(n, pa.string())
    else:
        prompt, bad = utf8_errors(plain(prompt))
        for row in bad:
            errors[row] = (f"prompt is not valid UTF-8 (row {first_row + row} of {uri}); store the prompt "
                           "as UTF-8 text")
    if DECODE_ERROR in table.column_names:
        for row, message in enumerate(table.column(DECODE_ERROR).to_pylist()):
            errors[row] = message or errors[row]
    columns = {"id": ids, cfg.prompt_column: prompt.cast(pa.string())}
    for name in cfg.passthrough:
        if name != cfg.prompt_column:
            columns[name] = plain(table.column(name))
    columns[INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def total_rows(files: Iterable[InputFile]) -> int:
    return sum(f.rows for f in files)
