"""Input column types made uniform: text in any of Arrow's forms read as plain strings, and
invalid UTF-8 found per value, so that a hostile file gives error rows, not a dead job."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def is_text(tp: pa.DataType) -> bool:
    """Text as Arrow stores it: string, large_string, string_view, or a dictionary of one of them."""
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)


def plain(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A dictionary column as its values, a string_view or large_string column as string: the same
    type in every block whatever each file chose, so blocks of different files concatenate."""
    tp = column.type
    if pa.types.is_dictionary(tp):
        column, tp = column.cast(tp.value_type), tp.value_type
    if pa.types.is_string_view(tp) or pa.types.is_large_string(tp):
        column = column.cast(pa.string())
    return column


def utf8_errors(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[int]]:
    """A string column with its invalid UTF-8 values nulled, and their positions (usually none;
    the per-value check runs only when the column does not validate as a whole)."""
    try:
        column.validate(full=True)
        return column, []
    except pa.ArrowInvalid:
        pass
    values = column.cast(pa.binary()).to_pylist()
    bad = []
    for row, value in enumerate(values):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(row)
    mask = np.zeros(len(values), bool)
    mask[bad] = True
    cleaned = pc.if_else(pa.array(mask), pa.scalar(None, pa.binary()), column.cast(pa.binary()))
    return cleaned.cast(pa.string()), bad


def plain_type(tp: pa.DataType) -> pa.DataType:
    """The type `plain` gives a column of type `tp`."""
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return pa.string() if pa.types.is_string_view(tp) or pa.types.is_large_string(tp) else tp
