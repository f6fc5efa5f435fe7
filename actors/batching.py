"""Generation batches of an actor's block of rows: cut in input order, or ordered by selection.

An actor routes a whole block of rows first (one probe pass per length bucket), then forms its
generation batches. With ordering "selection", rows are sorted by their selected adapters (in
weight order, so rows sharing their strongest adapter are neighbours) and then by prompt length,
and cut into batches of `batch_size`: rows that share adapters, and of similar length, are
generated together, so each batch's union of adapters (read on every decode step) stays near k
and its padding small. The block is the window: blocks of a few thousand rows (the pipeline's
`rows_per_block`) hold many rows of each task a job's prompts come from. Outputs return in input
order; a row's output does not depend on its batch.
"""

from __future__ import annotations

from typing import Sequence

ORDERINGS = ("selection", "input")


def generation_batches(lengths: Sequence[int], selections: Sequence[Sequence[int]], batch_size: int,
                       ordering: str) -> list[list[int]]:
    """Row positions per generation batch, each at most `batch_size` rows."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering={ordering!r} is not known; use one of {ORDERINGS}")
    rows = list(range(len(lengths)))
    if ordering == "selection":
        rows.sort(key=lambda r: (tuple(selections[r]), lengths[r], r))
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
