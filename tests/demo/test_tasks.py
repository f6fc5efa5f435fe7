"""The task suite: verified answers, recognisable prompts, seeded disjoint splits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from jobs.demo.data import SPLITS, SplitConfig, check_row, suite_split, task_split
from jobs.demo.tasks import TASK_NAMES, TASKS, extract_answer, get_task

SMALL = SplitConfig(n_train=80, n_val=20, n_test=20)


def test_suite_has_at_least_ten_distinct_tasks():
    assert len(TASKS) >= 10
    assert len(set(TASK_NAMES)) == len(TASKS)
    openings = {" ".join(task_split(n, "test", SMALL)[0]["prompt"].split()[:3]) for n in TASK_NAMES}
    assert len(openings) == len(TASKS), "every task's instruction must start differently"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_answer_passes_its_checker_and_wrong_ones_fail(name):
    task = get_task(name)
    for split in SPLITS:
        for row in task_split(name, split, SMALL):
            payload = json.loads(row["payload"])
            assert task.render(payload) == row["prompt"]
            assert check_row(row, row["answer"]), (row["prompt"], row["answer"])
            assert not check_row(row, row["answer"] + " x")
            assert not check_row(row, "")
            assert "\n" not in row["answer"] and len(row["answer"]) <= 30


@pytest.mark.parametrize("name", TASK_NAMES)
def test_checker_rejects_another_rows_answer(name):
    rows = task_split(name, "validation", SMALL)
    wrong = [(a, b) for a in rows for b in rows if a["answer"] != b["answer"]]
    assert wrong, f"{name}: all validation answers are equal"
    for a, b in wrong[:20]:
        assert not check_row(a, b["answer"])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_and_reproducible(name):
    splits = {s: task_split(name, s, SMALL) for s in SPLITS}
    prompts = [r["prompt"] for s in SPLITS for r in splits[s]]
    assert len(prompts) == len(set(prompts))
    assert len(splits["test"]) == SMALL.n_test and len(splits["validation"]) == SMALL.n_val
    assert splits == {s: task_split(name, s, SMALL) for s in SPLITS}
    other_seed = task_split(name, "test", replace(SMALL, seed=SMALL.seed + 1))
    assert [r["prompt"] for r in other_seed] != [r["prompt"] for r in splits["test"]]


def test_suite_split_mixes_tasks_deterministically():
    a = suite_split("test", per_task=3, cfg=SMALL)
    b = suite_split("test", per_task=3, cfg=SMALL)
    assert a.to_list() == b.to_list()
    assert len(a) == 3 * len(TASKS)
    assert sorted(set(a["task"])) == sorted(TASK_NAMES)
    assert a["task"][: len(TASKS)] != sorted(a["task"][: len(TASKS)])  # shuffled, not grouped


def test_extract_answer_takes_the_first_line():
    assert extract_answer(" 42\nmore text") == "42"
    assert extract_answer("  positive  ") == "positive"
    assert extract_answer("") == ""


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")
