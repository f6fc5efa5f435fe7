"""Seeded, disjoint train/validation/test splits of the demo task suite.

Every task draws unique prompts from its own generator (seeded by the suite seed and the task
name, so adding a task never changes another task's data), in a fixed order; the first
`n_test` go to test, the next `n_val` to validation and the rest (up to `n_train`) to training.
A prompt therefore appears in at most one split.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass

import datasets

from jobs.demo.tasks import TASK_NAMES, Task, get_task

SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How many examples each split holds and which seed draws them."""

    seed: int = 20260
    """Suite seed; each task's generator is seeded with `seed` mixed with the task name."""
    n_train: int = 320
    """Training examples per task (fewer when a task has fewer unique prompts)."""
    n_val: int = 40
    """Validation examples per task (adapter selection and the training report)."""
    n_test: int = 60
    """Held-out test examples per task (the quality benchmark)."""
    max_draws: int = 20000
    """Draw attempts per task before giving up on finding more unique prompts."""


def task_seed(name: str, seed: int) -> int:
    """The seed of one task's generator: stable across runs and Python versions."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def _unique_examples(task: Task, cfg: SplitConfig) -> list[dict[str, str]]:
    rng = random.Random(task_seed(task.name, cfg.seed))
    wanted = cfg.n_test + cfg.n_val + cfg.n_train
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for _ in range(cfg.max_draws):
        payload = task.draw(rng)
        prompt = task.render(payload)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"task": task.name, "prompt": prompt, "answer": task.solve(payload),
                     "payload": json.dumps(payload, sort_keys=True)})
        if len(rows) == wanted:
            break
    if len(rows) < cfg.n_test + cfg.n_val + 50:
        raise RuntimeError(f"task {task.name!r} has only {len(rows)} unique prompts; "
                           "lower SplitConfig.n_test/n_val or widen the generator")
    return rows


def task_split(name: str, split: str, cfg: SplitConfig = SplitConfig()) -> list[dict[str, str]]:
    """Rows (`task`, `prompt`, `answer`, `payload` as JSON) of one task's split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    rows = _unique_examples(get_task(name), cfg)
    bounds = {"test": (0, cfg.n_test), "validation": (cfg.n_test, cfg.n_test + cfg.n_val),
              "train": (cfg.n_test + cfg.n_val, len(rows))}
    lo, hi = bounds[split]
    return rows[lo:hi]


def suite_split(split: str, per_task: int | None = None, tasks: tuple[str, ...] = TASK_NAMES,
                cfg: SplitConfig = SplitConfig(), shuffle_seed: int | None = 0) -> datasets.Dataset:
    """All tasks' rows of one split (the first `per_task` of each), mixed in a seeded order."""
    rows = [r for name in tasks for r in task_split(name, split, cfg)[:per_task]]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return datasets.Dataset.from_list(rows)


def check_row(row: dict[str, str], answer: str) -> bool:
    """Whether `answer` is correct for `row`, by the task's own checker."""
    return get_task(row["task"]).check(json.loads(row["payload"]), answer)
