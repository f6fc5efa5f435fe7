"""Checks of an input file's columns against the job's input configuration that need its schema.

`check_input_schema` runs once per input file during discovery, on the names in its Parquet
footer, before any row is read; `check_column_types` then compares the files' footers with each
other, and `check_prompt_types` counts the rows a prompt column that is not text makes error rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.config import INTERNAL_PREFIX, InputConfig
from pipeline.errors import InputError, TooManyErrors, too_many

if TYPE_CHECKING:
    from pipeline.inputs import InputFile


def check_input_schema(names: Sequence[str], cfg: InputConfig, uri: str) -> None:
    """Refuse columns that the output would silently replace.

    - a column named `id` while `input.id_column` is unset: derived ids would take its place;
    - a column read into the dataflow (prompt, id or pass-through) named like the dataflow's own
      columns (`_logo_...`): its values would be overwritten.
    """
    if cfg.id_column is None and "id" in names:
        raise InputError(f"{uri}: has a column 'id', but input.id_column is not set, so every row would get a "
                         "derived id (<file>:<row>) in its place; set input.id_column: id to use that column as "
                         "the row id, or rename it and list it in input.passthrough to keep it")
    read = [cfg.prompt_column, *([cfg.id_column] if cfg.id_column else []), *cfg.passthrough]
    clash = [name for name in read if name in names and name.startswith(INTERNAL_PREFIX)]
    if clash:
        raise InputError(f"{uri}: column {clash[0]!r} is named like the dataflow's own columns "
                         f"({INTERNAL_PREFIX}...); rename it in the input")


TYPE_FIX = {"input.passthrough": "give it one type in every file, or leave it out of input.passthrough",
            "input.id_column": "give it one type in every file (ids are compared as strings once read, but Ray Data "
                               "reads the column of every file as one)"}


def check_column_types(found: list[tuple[InputFile, dict[tuple[str, str], pa.DataType]]]) -> None:
    """Each configured column that is read as one (pass-through, id) has one type in every file,
    from the footers' schemas: else the run would stop inside Ray Data with an ArrowTypeError."""
    first_file, first = found[0]
    for f, types in found[1:]:
        for (key, name), tp in types.items():
            if tp != first[key, name]:
                what = "pass-through column" if key == "input.passthrough" else "id column"
                raise InputError(f"{what} {name!r} ({key}) has type {first[key, name]} in {first_file.uri} but {tp} "
                                 f"in {f.uri}; {TYPE_FIX[key]}")


def check_prompt_types(files: list[InputFile], cfg: InputConfig, max_error_fraction: float) -> str | None:
    """The rows of files whose prompt column is not text become error rows in a run. Raises
    TooManyErrors when they alone are more than `max_error_fraction` of the input (the run would
    end uncommitted, exit 3, as `runner.check_errors` decides); else returns a line saying they will
    be error rows (None when there are none). `validate` lists what it raises or says."""
    bad = [f for f in files if not f.prompt_text]
    rows, total = sum(f.rows for f in bad), sum(f.rows for f in files)
    if not rows:
        return None
    more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
    what = (f"{bad[0].uri}: prompt column {cfg.prompt_column!r} has type {bad[0].prompt_type}, not string{more}; "
            f"its rows ({rows:,} of {total:,}, {rows / total:.1%})")
    if too_many(rows, total, max_error_fraction):
        raise TooManyErrors(f"{what} would be error rows, more than run.max_error_fraction={max_error_fraction}: "
                            "the run would stop uncommitted (exit 3). Store the column as strings, or accept those "
                            "rows with --set run.max_error_fraction=<higher>")
    return f"{what} will be error rows (within run.max_error_fraction={max_error_fraction})"
