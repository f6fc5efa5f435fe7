"""The shipped reference set's builder: prompts in the suite's format from task families outside both
pools and every BBH source, one family never crowding out the others, the same file every time."""

from __future__ import annotations

from jobs.demo import reference_set
from jobs.demo.bigbench import ANSWER_CUE, ARCHIVE_NAME
from tests.demo.test_bigbench import CHOICE, FREE, SUB_ONE, SUB_TWO, _write_archive


def _archive(tmp_path):
    navigate = {**FREE, "name": "navigate"}  # a BBH source: never a reference prompt
    pool_task = {**CHOICE, "name": "strategyqa"}  # a task of the BIG-bench pool
    return _write_archive(tmp_path / ARCHIVE_NAME, {
        "free/task.json": FREE, "choice/task.json": CHOICE, "family/one/task.json": SUB_ONE,
        "family/two/task.json": SUB_TWO, "navigate/task.json": navigate, "strategyqa/task.json": pool_task})


def test_prompts_come_from_other_families_in_the_suite_format(tmp_path):
    archive = _archive(tmp_path)
    prompts, record = reference_set.build(count=100, per_task=2, archive=archive)
    assert record["families"] == 3 and len(prompts) == 6  # free, choice, family: two each
    assert all(p.endswith(ANSWER_CUE) for p in prompts)
    assert {"navigate", "strategyqa"} <= set(record["families_excluded"])
    assert sum("Give the plural" in p for p in prompts) == 2  # only `free` has that prefix
    assert prompts[:3] != prompts[3:] and len(set(prompts)) == 6
    assert reference_set.build(count=100, per_task=2, archive=archive)[0] == prompts  # deterministic


def test_count_per_family_and_length_bound(tmp_path):
    archive = _archive(tmp_path)
    first, _ = reference_set.build(count=3, per_task=1, archive=archive)
    assert len(first) == 3 and len({p.split("\n")[0] for p in first}) == 3  # one per family first
    short, record = reference_set.build(count=100, per_task=5, archive=archive, max_chars=30)
    assert short and all(len(p) <= 30 for p in short) and record["max_chars"] == 30
