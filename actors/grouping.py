"""Grouping rows whose adapter selections overlap, and cutting rows into buckets of similar length.

The engine no longer groups rows (every generate call mixes all its rows at once, a fixed number of
ops per module: `actors.mixture`); `group_rows` stays for replaying the groups that runs of earlier
versions formed (`pipeline.run_report`). `length_buckets` cuts probe passes and generate calls.

The mixture of a group costs about |G| * |U_G| row-adapter products at every module (each row
multiplies by every adapter of its group's union), plus reading the union's factors once
(`union_cost` per adapter), plus a fixed cost per group (three kernel launches per module and
step). Grouping trades them:

    cost(groups) = sum_G ( |G| * |U_G| + union_cost * |U_G| + overhead )

In a prefill every row brings many tokens, so the products dominate (union_cost ~ 0: split rows
finely). In a decode step each row brings one token and reading the factors dominates (union_cost
of several rows: rows whose selections overlap share one read, so they should share a group).

Start from one group per distinct selection, then greedily merge the pair whose merge raises the
cost least, while a merge lowers the cost or there are more than `max_groups` groups.
Deterministic: ties go to the earliest pair in first-appearance order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


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
    """Split rows (each a selection of adapter indices) into at most `max_groups` groups.

    Clusters are rows of a boolean matrix over the adapters selected anywhere in the batch; the
    sizes of all pairwise unions come from one integer matrix product (|a u b| = |a| + |b| - |a n b|)
    kept up to date after each merge, so a merge step costs O(clusters^2) array work, not Python."""
    if max_groups < 1:
        raise ValueError(f"max_groups={max_groups}: must be >= 1")
    if union_cost < 0:
        raise ValueError(f"union_cost={union_cost}: must be >= 0")
    rows: list[list[int]] = []  # per cluster, first-appearance order
    by_key: dict[tuple[int, ...], int] = {}
    for row, selection in enumerate(selections):
        key = tuple(sorted(set(selection)))
        if key in by_key:
            rows[by_key[key]].append(row)
        else:
            by_key[key] = len(rows)
            rows.append([row])
    adapters = sorted({i for key in by_key for i in key})
    column = {a: j for j, a in enumerate(adapters)}
    member = np.zeros((len(rows), max(1, len(adapters))), dtype=np.int32)  # (clusters, adapters)
    for key, c in by_key.items():
        member[c, [column[a] for a in key]] = 1
    n = np.array([len(r) for r in rows], dtype=np.float64)  # rows per cluster
    u = member.sum(axis=1).astype(np.float64)  # union size per cluster
    inter = (member @ member.T).astype(np.float64)  # (clusters, clusters) shared adapters
    while len(rows) > 1:
        u_ab = u[:, None] + u[None, :] - inter
        delta = ((n[:, None] + n[None, :]) * u_ab - (n * u)[:, None] - (n * u)[None, :]
                 + union_cost * (u_ab - u[:, None] - u[None, :]) - overhead)
        delta[np.tril_indices(len(rows))] = np.inf
        flat = int(np.argmin(delta))  # row-major: ties go to the earliest pair in first-appearance order
        i, j = divmod(flat, len(rows))
        if delta[i, j] > 0 and len(rows) <= max_groups:
            break
        rows[i] = sorted(rows[i] + rows[j])
        del rows[j]
        member[i] |= member[j]
        member = np.delete(member, j, axis=0)
        n[i] += n[j]
        n, u, inter = np.delete(n, j), np.delete(u, j), np.delete(np.delete(inter, j, axis=0), j, axis=1)
        u[i] = member[i].sum()
        inter[i, :] = inter[:, i] = member @ member[i]
    return [Group(rows=tuple(r), union=tuple(adapters[j] for j in np.flatnonzero(member[c])))
            for c, r in enumerate(rows)]


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


def exact_length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Rows cut into buckets of one length each (no padding), shortest first, input order inside.

    What the probe uses in bfloat16 and float16: padding a row changes the width of its attention
    reductions, and in those dtypes the rounding then moves its routing scores (measured: 18 of 96
    top-20 selections of 48 prompts differed between alone and batched in bfloat16, 8 in float16),
    whereas rows of one length computed together equal each row alone, bit for bit, on this CPU.
    """
    by_length: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_length.setdefault(n, []).append(row)
    return [by_length[n] for n in sorted(by_length)]
