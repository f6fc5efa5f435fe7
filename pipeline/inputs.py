"""Input discovery and checks, row ids, and the read plan (no Ray here; `dataflow` wraps it).

Everything that can be wrong with the input is found on the driver before any actor starts:
no Parquet files, a missing prompt, id or pass-through column (the message lists the columns
that are there), a null or duplicate id (the message names both places). Only Parquet footers
are read, plus the id column when one is configured.

Row ids are the configured id column converted to strings, or `<file relative to input.uri>:<row>`.
The read plan cuts each file's rows still to do into slices of at most `rows_per_block` rows;
one slice becomes one Ray block, so there are enough blocks for every actor to work.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import InputConfig, StorageConfig

INPUT_ERROR = "_logo_input_error"
"""Internal column: why a row cannot be processed before the model sees it (null when fine)."""


class InputError(ValueError):
    """The input cannot be processed as configured; the message names the file and the fix."""


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
    """Arrow type of the prompt column in this file."""


@dataclass(frozen=True)
class Slice:
    file: InputFile
    """The file the rows come from."""
    positions: tuple[int, ...]
    """Row positions within the file, ascending."""
    ids: tuple[str, ...]
    """The rows' ids, same order."""


def _is_string(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


def list_files(cfg: InputConfig, config: StorageConfig) -> list[tuple[str, str, str]]:
    """(fs path, name relative to the input, URI) for every Parquet file of the input, sorted."""
    fs, root = storage.filesystem(cfg.uri, config)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [(root, root.rsplit("/", 1)[-1], cfg.uri)]
    if info.type == pafs.FileType.NotFound and not storage.is_s3(cfg.uri):
        raise InputError(f"input.uri {cfg.uri!r}: no such file or directory")
    found = []
    for item in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
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
        wanted = [("input.prompt_column", cfg.prompt_column)]
        wanted += [("input.id_column", cfg.id_column)] if cfg.id_column else []
        wanted += [("input.passthrough", name) for name in cfg.passthrough]
        for key, column in wanted:
            if column not in schema.names:
                raise InputError(f"{uri}: no column {column!r} ({key}); columns there: {', '.join(schema.names)}")
        groups = tuple(meta.metadata.row_group(i).num_rows for i in range(meta.metadata.num_row_groups))
        return InputFile(uri, rel, meta.metadata.num_rows, groups, str(schema.field(cfg.prompt_column).type))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(inspect, list_files(cfg, config)))


def row_ids(files: list[InputFile], cfg: InputConfig, config: StorageConfig) -> list[list[str]]:
    """Ids of every row, per file; a configured id column must be non-null and unique."""
    if cfg.id_column is None:
        return [[f"{f.name}:{row}" for row in range(f.rows)] for f in files]
    def read(f: InputFile) -> list[str]:
        column = _open(storage.filesystem(f.uri, config)[1], cfg, config).read(columns=[cfg.id_column]).column(0)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{f.uri}: row {row} has a null id in column {cfg.id_column!r} (input.id_column); "
                             "every row needs a unique id")
        return pc.cast(column, pa.string()).to_pylist()

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(read, files))
    seen: dict[str, tuple[str, int]] = {}
    for f, file_ids in zip(files, ids):
        for row, value in enumerate(file_ids):
            if value in seen:
                first_uri, first_row = seen[value]
                raise InputError(f"duplicate id {value!r} in column {cfg.id_column!r} (input.id_column): "
                                 f"{first_uri} row {first_row} and {f.uri} row {row}; ids must be unique")
            seen[value] = (f.uri, row)
    return ids


def default_rows_per_block(remaining: int, actors: int, batch_size: int) -> int:
    """About four blocks per actor, at least one batch and at most 4096 rows per block."""
    return int(min(4096, max(batch_size, -(-remaining // (4 * actors)))))


def plan_slices(files: list[InputFile], ids: list[list[str]], done: set[str], rows_per_block: int) -> list[Slice]:
    """Slices of at most `rows_per_block` rows covering every row whose id is not in `done`."""
    slices = []
    for f, file_ids in zip(files, ids):
        todo = [row for row, value in enumerate(file_ids) if value not in done]
        for start in range(0, len(todo), rows_per_block):
            rows = tuple(todo[start:start + rows_per_block])
            slices.append(Slice(f, rows, tuple(file_ids[r] for r in rows)))
    return slices


def _columns(cfg: InputConfig) -> list[str]:
    return list(dict.fromkeys([cfg.prompt_column, *cfg.passthrough]))


def read_slice(piece: Slice, cfg: InputConfig, config: StorageConfig) -> pa.Table:
    """The slice's rows: `id`, the prompt column, pass-through columns and INPUT_ERROR."""
    fs, path = storage.filesystem(piece.file.uri, config)
    parquet = pq.ParquetFile(fs.open_input_file(path))
    starts = np.cumsum((0,) + piece.file.row_groups)
    first = int(np.searchsorted(starts, piece.positions[0], side="right") - 1)
    last = int(np.searchsorted(starts, piece.positions[-1], side="right") - 1)
    table = parquet.read_row_groups(list(range(first, last + 1)), columns=_columns(cfg))
    table = table.take(pa.array(np.asarray(piece.positions) - starts[first]))
    n = table.num_rows
    prompt = table.column(cfg.prompt_column)
    errors = pa.nulls(n, pa.string())
    if not _is_string(prompt.type):
        message = (f"prompt is {prompt.type} in {piece.file.uri}, not string; store column "
                   f"{cfg.prompt_column!r} as strings")
        errors = pa.array([message] * n, pa.string())
        prompt = pa.nulls(n, pa.string())
    columns = {"id": pa.array(piece.ids, pa.string()), cfg.prompt_column: prompt.cast(pa.string())}
    for name in cfg.passthrough:
        if name != cfg.prompt_column:
            columns[name] = table.column(name)
    columns[INPUT_ERROR] = errors
    return pa.table(columns)


def total_rows(files: Iterable[InputFile]) -> int:
    return sum(f.rows for f in files)
