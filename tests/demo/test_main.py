"""The demo command's shipped prompt set and its wiring into the `logo-batch` CLI."""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from jobs.demo.data import check_row
from jobs.demo.main import PROMPTS, PROMPTS_PER_TASK, add_arguments, task_table, write_prompts
from jobs.demo.tasks import TASK_NAMES


def test_shipped_prompts_are_current(tmp_path):
    """The shipped Parquet equals what the generator writes now (rebuild: `write_prompts()`)."""
    shipped = pq.read_table(PROMPTS).to_pylist()
    fresh = pq.read_table(write_prompts(tmp_path / "p.parquet")).to_pylist()
    assert shipped == fresh
    assert len(shipped) == PROMPTS_PER_TASK * len(TASK_NAMES)
    assert len({r["id"] for r in shipped}) == len(shipped)
    assert all(check_row(r, r["answer"]) for r in shipped)


def test_demo_arguments_have_working_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.k is None and not args.paper, "the demo runs the job's default routing"
    assert args.max_new_tokens >= 8 and args.prompts == str(PROMPTS)


def test_task_table_counts_exact_matches_and_own_adapters():
    rows = pq.read_table(PROMPTS).to_pylist()
    for i, row in enumerate(rows):  # every answer right, own adapter first; but two rows fail
        row.update(output=row["answer"], adapters=[row["task"], "other"], error=None)
        if i < 2:
            row.update(output=None, adapters=[], error="prompt is empty or blank; give every row ...")
    table = task_table(rows).splitlines()
    assert table[0] == "| task | rows | errors | exact match | own adapter first |"
    assert len(table) == 2 + len(TASK_NAMES) + 1
    n = len(rows)
    assert table[-1] == f"| all | {n} | 2 | {n - 2} ({100 * (n - 2) / n:.0f}%) | {n - 2} ({100 * (n - 2) / n:.0f}%) |"
    failed = {rows[0]["task"], rows[1]["task"]}
    assert sum(line.split(" | ")[2] != "0" for line in table[2:-1]) == len(failed)
