"""The demo command's shipped prompt set and its wiring into the `logo-batch` CLI."""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq

from jobs.demo.data import check_row
from jobs.demo.main import PROMPTS, PROMPTS_PER_TASK, add_arguments, write_prompts
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
