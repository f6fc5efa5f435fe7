"""Grouping rows by overlapping selections."""

from __future__ import annotations

import random

import pytest

from actors.grouping import group_rows, length_buckets, single_group


def cost(groups, overhead):
    return sum(len(g.rows) * len(g.union) + overhead for g in groups)


def test_identical_selections_share_a_group_and_clusters_split():
    # Two clusters of 4 rows over disjoint adapters {0..3} and {10..13}.
    a, b = (0, 1, 2, 3), (10, 11, 12, 13)
    selections = [a, b, a, b, (1, 0, 3, 2), b, a, (13, 12, 11, 10)]
    groups = group_rows(selections, max_groups=8, overhead=2.0)
    assert [g.rows for g in groups] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert [g.union for g in groups] == [a, b]
    assert cost(groups, 2.0) < cost(single_group(selections), 2.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_groups", [1, 3, 8])
def test_partition_and_bound(seed, max_groups):
    rng = random.Random(seed)
    selections = [tuple(rng.sample(range(32), rng.randint(1, 6))) for _ in range(40)]
    groups = group_rows(selections, max_groups=max_groups, overhead=4.0)
    assert len(groups) <= max_groups
    assert sorted(r for g in groups for r in g.rows) == list(range(40))
    for g in groups:
        assert set(g.union) == set().union(*(selections[r] for r in g.rows))
    assert cost(groups, 4.0) <= cost(single_group(selections), 4.0)
    assert groups == group_rows(selections, max_groups=max_groups, overhead=4.0)  # deterministic


def test_large_overhead_means_one_group():
    selections = [(0,), (1,), (2,), (3,)]
    assert len(group_rows(selections, max_groups=8, overhead=100.0)) == 1
    assert len(group_rows(selections, max_groups=8, overhead=0.0)) == 4


def test_bad_bound():
    with pytest.raises(ValueError, match="max_groups"):
        group_rows([(0,)], max_groups=0)


def test_length_buckets_partition_rows_and_save_padding():
    lengths = [114, 123, 121, 192, 143, 288, 271, 178]
    buckets = length_buckets(lengths, overhead=64)
    assert sorted(r for b in buckets for r in b) == list(range(len(lengths)))
    assert [max(lengths[r] for r in b) for b in buckets] == sorted(max(lengths[r] for r in b) for b in buckets)
    padded = sum(len(b) * max(lengths[r] for r in b) + 64 for b in buckets)
    assert 1 < len(buckets) < len(lengths) and padded < len(lengths) * max(lengths) + 64
    assert length_buckets(lengths, overhead=float("inf")) == [sorted(range(8), key=lambda r: lengths[r])]
    assert length_buckets(lengths, overhead=0) == [[r] for r in sorted(range(8), key=lambda r: lengths[r])]
