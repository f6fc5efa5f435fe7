"""Small read units packed together: one read task and one block for the rows of several small files.

    units (plan_reads)   | a:1 | b:1 | c:1 | d:30 (3 slices) | e:1 | f:1 |   (rows_per_block = 10)
    read tasks (pack)    | Pack(a, b, c)   | d               | Pack(e, f)|
    blocks               | [a0 b0 c0]      | [10) [10) [10)  | [e0 f0]   |

A unit with fewer rows to do than `rows_per_block` is small; consecutive small units are packed
while their rows fit in one block. A pack's block is its units' slices concatenated: every row
keeps its own file index and row position (`_logo_file`, `_logo_row`), so the data file written
from it records each file's row ranges in its footer, and exactly-once accounting and resume
work as for any block. A pack's members are read concurrently (small files cost a request each).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from pipeline.config import InputConfig, StorageConfig
from pipeline.inputs import ReadUnit, read_unit

READERS = 8
"""Member units of a pack read at once."""


@dataclass(frozen=True)
class Pack:
    """One read task over several small read units; their rows make one block."""

    units: tuple[ReadUnit, ...]
    """The units, in plan order (each has fewer rows to do than `rows_per_block`)."""

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def decoded_rows(self) -> int:
        return sum(u.decoded_rows for u in self.units)

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.file.uri for u in self.units))


Task = ReadUnit | Pack
"""A read task: one unit (a block per slice) or a pack of small units (one block)."""


def pack_units(units: list[ReadUnit], rows_per_block: int) -> list[Task]:
    """The units as read tasks, consecutive small ones packed up to `rows_per_block` rows."""
    tasks: list[Task] = []
    group: list[ReadUnit] = []

    def flush() -> None:
        if group:
            tasks.append(group[0] if len(group) == 1 else Pack(tuple(group)))
            group.clear()

    for unit in units:
        if unit.rows >= rows_per_block:
            flush()
            tasks.append(unit)
            continue
        if sum(u.rows for u in group) + unit.rows > rows_per_block:
            flush()
        group.append(unit)
    flush()
    return tasks


def block_rows(task: Task) -> int:
    """Rows of the task's largest block."""
    return task.rows if isinstance(task, Pack) else max(s.rows for s in task.slices)


def blocks(task: Task) -> int:
    return 1 if isinstance(task, Pack) else len(task.slices)


def uris(task: Task) -> tuple[str, ...]:
    return task.uris if isinstance(task, Pack) else (task.file.uri,)


def read_task(task: Task, cfg: InputConfig, config: StorageConfig) -> Iterator[pa.Table]:
    """The task's blocks: a unit's slices, or one block of a pack's rows."""
    if isinstance(task, ReadUnit):
        yield from read_unit(task, cfg, config)
        return
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        tables = list(pool.map(lambda unit: pa.concat_tables(list(read_unit(unit, cfg, config))), task.units))
    yield pa.concat_tables(tables, promote_options="permissive")
