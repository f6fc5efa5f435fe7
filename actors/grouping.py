"""Grouping rows whose adapter selections overlap, so that each group's union stays small.

The mixture of a group costs about |G| * |U_G| row-adapter products at every module (each row
multiplies by every adapter of its group's union), plus reading the union's factors once
(`union_cost` per adapter), plus a fixed cost per group (three kernel launches per module and
step). Grouping trades them:

    cost(groups) = sum_G ( |G| * |U_G| + union_cost * |U_G| + overhead )

In a prefill every row brings many tokens, so the products dominate (union_cost ~ 0: split rows
finely). In a decode step each row brings one token and reading the factors dominates (union_cost
of several rows: rows whose selections overlap share one read, so they should share a group).

Start from one group per distinct selection, then greedily merge the pair whose merge raises the
cost least, while a merge lowers the cost or there are more than `max_groups` groups. Selections are
bit masks, so a union is one OR and its size one popcount. Deterministic: ties go to the earliest
pair in first-appearance order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Group:
    """Rows of a batch that are mixed together, and the union of their selected adapters."""

    rows: tuple[int, ...]  # positions in the batch
    union: tuple[int, ...]  # adapter indices in the pool, ascending


def _mask(selection: Sequence[int]) -> int:
    m = 0
    for i in selection:
        m |= 1 << i
    return m


def _indices(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def group_rows(selections: Sequence[Sequence[int]], max_groups: int = 8, overhead: float = 8.0,
               union_cost: float = 0.0) -> list[Group]:
    """Split rows (each a selection of adapter indices) into at most `max_groups` groups."""
    if max_groups < 1:
        raise ValueError(f"max_groups={max_groups}: must be >= 1")
    if union_cost < 0:
        raise ValueError(f"union_cost={union_cost}: must be >= 0")
    clusters: list[tuple[list[int], int]] = []  # (rows, union mask), first-appearance order
    by_mask: dict[int, int] = {}
    for row, selection in enumerate(selections):
        m = _mask(selection)
        if m in by_mask:
            clusters[by_mask[m]][0].append(row)
        else:
            by_mask[m] = len(clusters)
            clusters.append(([row], m))

    def merge_delta(a: tuple[list[int], int], b: tuple[list[int], int]) -> float:
        n_a, n_b = len(a[0]), len(b[0])
        u_a, u_b, u_ab = a[1].bit_count(), b[1].bit_count(), (a[1] | b[1]).bit_count()
        return (n_a + n_b) * u_ab - n_a * u_a - n_b * u_b + union_cost * (u_ab - u_a - u_b) - overhead

    while len(clusters) > 1:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = merge_delta(clusters[i], clusters[j])
                if best is None or d < best[0]:
                    best = (d, i, j)
        delta, i, j = best
        if delta > 0 and len(clusters) <= max_groups:
            break
        rows = sorted(clusters[i][0] + clusters[j][0])
        clusters[i] = (rows, clusters[i][1] | clusters[j][1])
        del clusters[j]
    return [Group(rows=tuple(rows), union=_indices(m)) for rows, m in clusters]


def single_group(selections: Sequence[Sequence[int]]) -> list[Group]:
    """No grouping: every row in one group over the union of all selections."""
    m = 0
    for selection in selections:
        m |= _mask(selection)
    return [Group(rows=tuple(range(len(selections))), union=_indices(m))]


def length_buckets(lengths: Sequence[int], overhead: float) -> list[list[int]]:
    """Rows cut into buckets of similar length, each padded to its longest row.

    Rows are sorted by length and cut into consecutive runs minimising
    `sum_bucket (rows * longest + overhead)` (token slots computed, padding included, plus a fixed
    cost per pass), by dynamic programming. Returns row indices per bucket, shortest bucket first.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]
