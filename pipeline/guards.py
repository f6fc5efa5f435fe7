"""Checks of an input file's columns against the job's input configuration that need its schema.

`check_input_schema` runs once per input file during discovery, on the names in its Parquet
footer, before any row is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import INTERNAL_PREFIX, InputConfig
from pipeline.errors import InputError


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
