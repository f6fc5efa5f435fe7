"""The BIG-bench suite reader: tasks read from a tar archive laid out like the sdist (a small one
built here), prompts, options, answers, seeded disjoint splits, and the error when the archive
cannot be fetched. Nothing here downloads."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.demo import bigbench
from jobs.demo.bigbench import (ANSWER_CUE, SplitConfig, adapter_name, answers, archive_path, build_prompt,
                                check_row, fetch_archive, list_tasks, read_tasks, split_rows, task_rows,
                                task_splits)

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
CFG = SplitConfig(n_train=30, n_val=5, n_test=5)

FREE = {"name": "free", "task_prefix": "Give the plural of the word.\n",
        "examples": [{"input": f"word{i}", "target": [f"word{i}s", f"Word{i}S"]} for i in range(60)]}
CHOICE = {"name": "choice",
          "examples": [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1),
                                                                    "maybe": 0}} for i in range(60)]}
PARENT = {"name": "family", "description": "a task with subtasks", "subtasks": ["one", "two"]}
SUB_ONE = {"name": "family:one", "task_prefix": "One:", "examples": [{"input": f"a{i}", "target": "x"} for i in range(20)]}
SUB_TWO = {"name": "family:two", "task_prefix": "Two:", "examples": [{"input": f"b{i}", "target": "y"} for i in range(20)]}


def _write_archive(path: Path, files: dict[str, dict | bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(f"{ROOT}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return _write_archive(tmp_path_factory.mktemp("bb") / bigbench.ARCHIVE_NAME, {
        "free/task.json": FREE, "free/README.md": b"not a task", "choice/task.json": CHOICE,
        "family/task.json": PARENT, "family/one/task.json": SUB_ONE, "family/two/task.json": SUB_TWO})


def test_reads_named_tasks_and_merges_a_tasks_subtasks(archive):
    tasks = read_tasks(["choice", "family"], archive)
    assert list(tasks) == ["choice", "family"]
    assert [t["name"] for t in tasks["family"]] == ["family:one", "family:two"]  # the parent holds no examples
    assert read_tasks(["family/two"], archive)["family/two"][0]["name"] == "family:two"
    assert list_tasks(archive) == ["choice", "family/one", "family/two", "free"]


def test_an_unknown_task_is_an_error_naming_it(archive):
    with pytest.raises(KeyError, match="no_such_task"):
        read_tasks(["free", "no_such_task"], archive)


def test_prompt_is_prefix_input_options_then_the_answer_cue():
    example = {"input": "  Is 4 even? ", "target_scores": {"yes": 1, "no": 0, "maybe": 0}}
    prompt = build_prompt("Answer the question.\n", example, random.Random(0))
    lines = prompt.split("\n")
    assert lines[0] == "Answer the question." and lines[1] == "Is 4 even?" and lines[2] == "Options:"
    assert sorted(lines[3:6]) == ["- maybe", "- no", "- yes"]
    assert prompt.endswith(ANSWER_CUE) and lines[6] == "Answer:"
    assert build_prompt("", {"input": "word"}, random.Random(0)) == "word\nAnswer:"  # free answer: no options


def test_option_order_is_seeded_per_example_and_varies():
    example = {"input": "q", "target_scores": {c: int(c == "a") for c in "abcdef"}}
    assert build_prompt("", example, random.Random(3)) == build_prompt("", example, random.Random(3))
    orders = {build_prompt("", example, random.Random(s)) for s in range(10)}
    assert len(orders) > 1, "the correct option must not always sit in the same place"
    assert list(example["target_scores"]) == list("abcdef"), "the example itself is not reordered"


def test_answer_is_the_best_scored_option_or_the_target():
    assert answers({"input": "q", "target_scores": {"a": 0, "b": 1, "c": 0.5}}) == ["b"]
    assert answers({"input": "q", "target_scores": {"a": 1, "b": 0, "c": 1}}) == ["a", "c"]  # ties: all accepted
    # target_scores wins over a free-text target (strategyqa ships both)
    assert answers({"input": "q", "target_scores": {"Yes": 1, "No": 0}, "target": "Yes. Because ..."}) == ["Yes"]
    assert answers({"input": "q", "target": "  x "}) == ["x"]
    assert answers({"input": "q", "target": ["p", "q"]}) == ["p", "q"]


def test_rows_carry_the_answer_and_every_accepted_one(archive):
    parts = read_tasks(["free", "choice"], archive)
    free = task_rows("free", parts["free"], CFG)
    row = next(r for r in free if r["prompt"] == "Give the plural of the word.\nword7\nAnswer:")
    assert row["answer"] == "word7s" and row["task"] == "free"
    assert check_row(row, "word7s") and check_row(row, "Word7S.") and check_row(row, " word7s \n")
    assert not check_row(row, "word8s") and not check_row(row, "")
    choice = task_rows("choice", parts["choice"], CFG)
    for r in choice:
        number = int(r["prompt"].split("Is ", 1)[1].split(" ", 1)[0])
        assert r["answer"] == ("yes" if number % 2 == 0 else "no")
        assert json.loads(r["payload"])["multiple_choice"] is True
        assert not check_row(r, "maybe")


def test_splits_are_disjoint_seeded_and_sized(archive):
    splits = task_splits(["free", "choice", "family"], CFG, archive)
    for name, parts in splits.items():
        prompts = {s: [r["prompt"] for r in rows] for s, rows in parts.items()}
        assert len(prompts["test"]) == 5 and len(prompts["validation"]) == 5
        assert len(set(prompts["test"]) | set(prompts["validation"]) | set(prompts["train"])) == \
            sum(len(p) for p in prompts.values()), f"{name}: a prompt is in two splits"
    assert len(splits["free"]["train"]) == 30 and len(splits["family"]["train"]) == 30  # 40 examples, 10 held out
    assert {r["answer"] for r in splits["family"]["train"]} == {"x", "y"}  # both subtasks
    again = task_splits(["free"], CFG, archive)["free"]
    assert again == splits["free"], "the same seed gives the same splits"
    other = task_splits(["free"], replace(CFG, seed=1), archive)["free"]
    assert [r["prompt"] for r in other["test"]] != [r["prompt"] for r in splits["free"]["test"]]
    with pytest.raises(ValueError, match="unknown split"):
        split_rows([], "dev", CFG)


def test_overlong_or_multiline_examples_and_repeated_prompts_are_left_out():
    task = {"examples": [{"input": "short", "target": "ok"}, {"input": "x" * 700, "target": "ok"},
                         {"input": "two lines", "target": "a\nb"}, {"input": "long answer", "target": "z" * 50},
                         {"input": "dup", "target": "1"}, {"input": "dup", "target": "2"},
                         {"input": "empty", "target": []}, {"input": 3, "target": "not a string input"}]}
    rows = task_rows("t", [task], SplitConfig())
    assert [r["prompt"] for r in rows] == ["short\nAnswer:"]


def test_a_missing_archive_is_fetched_and_offline_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps bigbench==1.0.0"):
        archive_path(tmp_path, fetch=False)
    # an unreachable index and no pip configuration: what an offline machine sees
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv(bigbench.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"(?s)could not fetch bigbench==1\.0\.0.*pip download --no-deps"):
        archive_path()
    assert not list((tmp_path / "cache" / "bigbench").iterdir()), "nothing half-written is left behind"
    # a copy placed where the error says is used as is
    _write_archive(tmp_path / "cache" / "bigbench" / bigbench.ARCHIVE_NAME, {"free/task.json": FREE})
    assert list_tasks(archive_path()) == ["free"]
    with pytest.raises(RuntimeError, match="could not fetch"):
        fetch_archive(tmp_path / "elsewhere")  # an explicit fetch still goes through pip


def test_adapter_names_are_flat_and_the_pool_leaves_bbh_out():
    assert adapter_name("logical_deduction/three_objects") == "logical_deduction__three_objects"
    assert len(bigbench.POOL_TASKS) >= 24 and len(set(bigbench.POOL_TASKS)) == len(bigbench.POOL_TASKS)
    assert not {t.split("/")[0] for t in bigbench.POOL_TASKS} & set(bigbench.BBH_TASKS)
    held_out = set(bigbench.HELD_OUT_TASKS)
    assert len(held_out) >= 8 and held_out <= set(bigbench.BBH_TASKS)
